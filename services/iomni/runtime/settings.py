"""One frozen `Settings` for every process that runs turns (gateway, Kafka worker, embedded CLI).

Each field is written once here, with its default and help. A value comes from, in order: the
command-line flag (`--max-concurrent-turns`, plus older aliases such as `--redis`), the
environment (`IOMNI_MAX_CONCURRENT_TURNS`), a per-process default (`PROCESS_DEFAULTS`), then the
field's default. The Helm chart passes the same flags (its values are the camelCase of these
names; `tests/helm` parses the rendered arguments with this parser).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from iomni.errors import InvalidInput

Process = Literal["gateway", "worker", "chat"]
ENV_PREFIX = "IOMNI_"
BOTH: tuple[Process, ...] = ("gateway", "worker")
ALL: tuple[Process, ...] = ("gateway", "worker", "chat")


def setting(
    default: Any,
    help: str,
    *,
    flags: tuple[str, ...] = (),
    processes: tuple[Process, ...] = BOTH,
) -> Any:
    return field(default=default, metadata={"help": help, "flags": flags, "processes": processes})


@dataclass(frozen=True)
class Settings:
    # -- the model and where its parts run ---------------------------------------------------
    model: Path | None = setting(
        None, "checkpoint directory (config + tokenizer; weights stay in Triton)"
    )
    transport: Literal["triton", "inprocess"] = setting(
        "triton", "model parts over Triton, or in this process (embedded)"
    )
    triton_url: str = setting("127.0.0.1:8001", "Triton gRPC host:port", flags=("--triton",))
    triton_vision: str = setting("", "vision_encoder host:port (default --triton)")
    triton_audio: str = setting("", "audio_encoder host:port (default --triton)")
    triton_speech: str = setting("", "speech_decoder host:port (default --triton)")
    llm_replicas: tuple[str, ...] = setting(
        (), "llm replica host:port list for KV affinity (default: --triton)"
    )
    llm_service: str = setting("", "headless llm Service: replicas from its EndpointSlices")
    namespace: str = setting("default", "Kubernetes namespace of --llm-service")
    # Both change the audio (docs/speech.md); read by the speech decoder itself, in Triton too.
    speech_first_chunk_tokens: int = setting(
        0,
        "inprocess: speech tokens in a reply's first audio chunk, 5..25 (0: 25, the default); "
        "fewer: earlier first audio",
        processes=ALL,
    )
    speech_flow_steps: int = setting(
        0, "inprocess: Euler steps of the speech flow (0: the checkpoint's)", processes=ALL
    )
    speech_workers: int = setting(
        0,
        "inprocess on CPU: speech decoder processes, each rendering on its own core "
        "(0: 2, or 1 on one core)",
        processes=ALL,
    )
    # -- dialogue state ----------------------------------------------------------------------
    redis_url: str = setting(
        "redis://127.0.0.1:6379/0", "Redis URL, or 'memory' (one process)", flags=("--redis",)
    )
    lease_ttl_ms: int = setting(
        6000, "session lease TTL; renewed every third of it, so a dead holder's lapses fast"
    )
    # -- limits ------------------------------------------------------------------------------
    max_concurrent_turns: int = setting(16, "turns at once in this process (beyond: rejected)")
    max_message_mb: int = setting(32, "largest gRPC message, and largest user turn (MiB)")
    max_media_per_turn: int = setting(16, "images, clips and videos in one user turn")
    max_audio_seconds: float = setting(300.0, "longest audio clip")
    turn_timeout_s: float = setting(300.0, "a turn's deadline (s)", flags=("--turn-timeout",))
    # -- the gRPC front door -----------------------------------------------------------------
    tenants: Path | None = setting(None, "tenants JSON (API key hashes)", processes=("gateway",))
    host: str = setting("127.0.0.1", "address the gRPC server binds", processes=("gateway",))
    port: int = setting(50051, "gRPC port", processes=("gateway",))
    metrics_host: str = setting("127.0.0.1", "address the /metrics endpoint binds")
    metrics_port: int = setting(9464, "Prometheus /metrics port")
    grace_s: float = setting(
        30.0, "seconds in-flight turns get on SIGTERM", flags=("--grace",), processes=("gateway",)
    )
    tls_cert: Path | None = setting(None, "server certificate (TLS)", processes=("gateway",))
    tls_key: Path | None = setting(None, "server key (TLS)", processes=("gateway",))
    tls_client_ca: Path | None = setting(
        None, "require client certificates signed by this CA (mTLS)", processes=("gateway",)
    )
    reflection: bool = setting(True, "serve gRPC reflection", processes=("gateway",))
    stream_idle_timeout_s: float = setting(
        300.0,
        "end a Converse stream that sends nothing for this long while no turn runs",
        processes=("gateway",),
    )
    events_bootstrap: str = setting(
        "", "Kafka bootstrap: also publish every turn's events to the log", processes=("gateway",)
    )
    # -- the Realtime (WebSocket) front door and the playground ------------------------------
    realtime_host: str = setting(
        "127.0.0.1", "address the Realtime/HTTP port binds", processes=("gateway",)
    )
    realtime_port: int = setting(
        8080, "OpenAI Realtime WebSocket + playground port (0: off)", processes=("gateway",)
    )
    realtime_idle_timeout_s: float = setting(
        300.0,
        "close a Realtime connection after this long without a client event",
        processes=("gateway",),
    )
    realtime_send_queue: int = setting(
        2048,
        "server events queued for a slow client before it is disconnected",
        processes=("gateway",),
    )
    # -- the Kafka worker --------------------------------------------------------------------
    bootstrap: str = setting("127.0.0.1:9092", "Kafka bootstrap servers", processes=("worker",))
    partitions: int = setting(6, "partitions of topics it creates", processes=("worker",))
    group: str = setting("iomni-turn-workers", "consumer group", processes=("worker",))
    session_timeout_ms: int = setting(10000, "consumer session timeout", processes=("worker",))
    max_in_flight: int = setting(
        4, "records in flight before partitions pause", processes=("worker",)
    )

    @property
    def max_turn_bytes(self) -> int:
        return self.max_message_mb << 20

    @property
    def part_urls(self) -> dict[str, str]:
        """Triton model -> host:port for parts that live at their own address."""
        pairs = (
            ("vision_encoder", self.triton_vision),
            ("audio_encoder", self.triton_audio),
            ("speech_decoder", self.triton_speech),
        )
        return {model: url for model, url in pairs if url}

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    # -- where values come from --------------------------------------------------------------

    @classmethod
    def resolve(
        cls,
        process: Process,
        args: argparse.Namespace | None = None,
        env: Mapping[str, str] | None = None,
    ) -> Settings:
        """Flags over environment over per-process defaults over field defaults."""
        env = os.environ if env is None else env
        values: dict[str, Any] = dict(PROCESS_DEFAULTS.get(process, {}))
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            name = f"{ENV_PREFIX}{f.name.upper()}"
            if name in env:
                values[f.name] = _parse(env[name], hints[f.name], name)
            flag = getattr(args, f.name, None) if args is not None else None
            if flag is not None:
                values[f.name] = _coerce(flag, hints[f.name])
        return cls(**values)


# Defaults that differ by process (the worker shares a host with a gateway in `make up`).
PROCESS_DEFAULTS: dict[str, dict[str, Any]] = {
    "worker": {"metrics_port": 9465, "max_concurrent_turns": 4},
}


def flag_names(f: dataclasses.Field) -> list[str]:
    return [f"--{f.name.replace('_', '-')}", *f.metadata.get("flags", ())]


def add_settings_flags(parser: argparse.ArgumentParser, process: Process) -> None:
    """One flag per setting the process uses; unset flags stay None (env and defaults fill)."""
    hints = typing.get_type_hints(Settings)
    for f in fields(Settings):
        if process not in f.metadata["processes"]:
            continue
        kind = hints[f.name]
        default = PROCESS_DEFAULTS.get(process, {}).get(f.name, f.default)
        help_text = f"{f.metadata['help']} [{_env_name(f)}; default {default!r}]"
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text}
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif _is_tuple(kind):
            kwargs["nargs"] = "*"
        else:
            kwargs["type"] = _scalar(kind)
        parser.add_argument(*flag_names(f), **kwargs)


def _env_name(f: dataclasses.Field) -> str:
    return f"{ENV_PREFIX}{f.name.upper()}"


def _is_tuple(kind: Any) -> bool:
    return typing.get_origin(kind) is tuple


def _scalar(kind: Any) -> Any:
    """int, float, str or Path, from a possibly optional or literal annotation."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return next(_scalar(a) for a in typing.get_args(kind) if a is not type(None))
    if origin is Literal:
        return str
    return kind


def _coerce(value: Any, kind: Any) -> Any:
    if _is_tuple(kind):
        return tuple(value)
    return value


def _parse(text: str, kind: Any, name: str) -> Any:
    try:
        if kind is bool:
            if text.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return text.lower() in ("1", "true", "yes", "on")
        if _is_tuple(kind):
            return tuple(item for item in text.replace(",", " ").split() if item)
        if text == "" and _scalar(kind) is Path:
            return None
        return _scalar(kind)(text)
    except ValueError as exc:
        raise InvalidInput(f"{name}={text!r} is not a valid {_scalar(kind).__name__}") from exc
