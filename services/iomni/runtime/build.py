"""`build_runner(settings)`: the turn core wired once, for the gateway, the worker and the CLI.

Transport (Triton with KV-affinity routing, or in-process), dialogue state (Redis, or memory),
the engine with its limits, and the observer. Front doors get a `Runtime` and never assemble
these pieces themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from dataclasses import dataclass, field

from iomni.engine.turn import TurnEngine, TurnLimits
from iomni.errors import InvalidInput
from iomni.model.checkpoint import fingerprint
from iomni.model.media import MediaLimits
from iomni.model.processor import Processor
from iomni.parts import ModelParts
from iomni.runtime.affinity import AffinityRouter
from iomni.runtime.settings import Settings
from iomni.turns.observer import NullObserver, TurnObserver
from iomni.turns.runner import RunnerLimits, TurnRunner
from iomni.turns.store import DialogueStore, MemoryDialogueStore


@dataclass
class Runtime:
    settings: Settings
    runner: TurnRunner
    store: DialogueStore
    parts: ModelParts
    processor: Processor
    router: AffinityRouter | None = None
    _tasks: list[asyncio.Task] = field(default_factory=list)
    _watcher: object | None = None

    async def start(self) -> None:
        """Background work: following the llm replicas in Kubernetes."""
        if self._watcher is not None:
            self._tasks.append(asyncio.create_task(self._watcher.run()))  # type: ignore[attr-defined]

    async def check_ready(self) -> None:
        """Unavailable (naming what is down) unless state and every model part answer."""
        await self.store.ping()
        check = getattr(self.parts, "check_ready", None)
        if check is not None:
            await check()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stopped = True  # type: ignore[attr-defined]
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        close = getattr(self.parts, "close", None)
        if close is not None:
            await close()
        aclose = getattr(self.store, "aclose", None)
        if aclose is not None:
            await aclose()


def owner_name(role: str) -> str:
    """A lease owner unique to this process (a restarted process never looks like itself)."""
    return f"{socket.gethostname()}-{os.getpid()}-{role}-{uuid.uuid4().hex[:6]}"


def build_runner(
    settings: Settings,
    *,
    role: str = "gateway",
    observer: TurnObserver | None = None,
    store: DialogueStore | None = None,
    speech_process: bool | None = None,
) -> Runtime:
    """`speech_process` (in-process transport): see `InProcessParts`; False for a process that
    runs one turn, where the speech decoder's own process would cost seconds to start."""
    if settings.model is None:
        raise InvalidInput("no checkpoint: pass --model DIR (or set IOMNI_MODEL)")
    processor = Processor.from_checkpoint(
        settings.model, MediaLimits(max_audio_seconds=settings.max_audio_seconds)
    )
    store = store or _store(settings)
    observer = observer or NullObserver()
    router = None
    watcher = None
    if settings.transport == "inprocess":
        from iomni.engine.parts import InProcessParts
        from iomni.model.checkpoint import load_checkpoint
        from iomni.model.speech.stream import SpeechSettings

        speech = SpeechSettings(
            first_chunk_tokens=settings.speech_first_chunk_tokens,
            flow_steps=settings.speech_flow_steps,
        )
        in_process = InProcessParts(
            load_checkpoint(settings.model),
            speech=speech,
            speech_process=speech_process,
            speech_workers=settings.speech_workers or None,
            on_speech_metric=observer.speech_scheduler,
        )
        in_process.prepare_speech()
        parts: ModelParts = in_process
    elif settings.transport == "triton":
        parts, router, watcher = _triton_parts(settings, processor, store, observer)
    else:
        raise InvalidInput(f"transport must be 'triton' or 'inprocess', not {settings.transport!r}")
    engine = TurnEngine(
        parts,
        processor,
        embeddings=store.embedding_cache(),
        media=store.media_store(),
        limits=TurnLimits(max_media_per_turn=settings.max_media_per_turn),
    )
    runner = TurnRunner(
        engine,
        store,
        owner_name(role),
        RunnerLimits(
            max_concurrent_turns=settings.max_concurrent_turns,
            turn_timeout_s=settings.turn_timeout_s,
            max_turn_bytes=settings.max_turn_bytes,
        ),
        observer,
    )
    return Runtime(settings, runner, store, parts, processor, router, _watcher=watcher)


def _store(settings: Settings) -> DialogueStore:
    if settings.redis_url == "memory":
        return MemoryDialogueStore(lease_ttl_ms=settings.lease_ttl_ms)
    from iomni.state import DialogueState

    return DialogueState.from_url(settings.redis_url, lease_ttl_ms=settings.lease_ttl_ms)


def _triton_parts(settings: Settings, processor: Processor, store, observer):  # type: ignore[no-untyped-def]
    from iomni.triton.client import TritonParts
    from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS

    assert settings.model is not None
    router = AffinityRouter(
        store, list(settings.llm_replicas) or [settings.triton_url], on_result=observer.affinity
    )
    watcher = None
    if settings.llm_service:
        from iomni.runtime.discovery import EndpointSliceWatcher

        router.update([])
        watcher = EndpointSliceWatcher(settings.llm_service, settings.namespace, router.update)
    special = processor.tokenizer.special
    parts = TritonParts(
        settings.triton_url,
        fingerprint(settings.model),
        {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
        llm_router=router,
        model_urls=settings.part_urls,
    )
    return parts, router, watcher
