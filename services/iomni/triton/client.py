"""`TritonParts`: the engine's `ModelParts` over tritonclient's asyncio gRPC client.

Encoders are plain requests (retried on UNAVAILABLE: they are idempotent); the LLM and the
speech decoder are streams. Closing the LLM generator cancels its stream, which Triton turns
into `is_cancelled()` on the server within milliseconds; the batcher drops the sequence before
its next decode step.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

import grpc
import numpy as np
import torch
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.utils import InferenceServerException

from iomni.errors import DeadlineExceeded, Internal, InvalidInput, IomniError, Unavailable
from iomni.parts import GenerationRequest, LLMStep, SpeechOptions
from iomni.telemetry.tracing import context_headers
from iomni.triton.tensors import (
    AUDIO,
    AUDIO_EMBEDS,
    BATCH_SIZE,
    CONTRACTS,
    FINISH_REASON,
    HIDDEN,
    IMAGE_EMBEDS,
    INPUT_IDS,
    LLM,
    MEL,
    MODELS,
    PIXEL_VALUES,
    REUSED_TOKENS,
    SPEAKER_WAV,
    SPEECH_DECODER,
    TEXT_TOKEN_IDS,
    TOKEN_ID,
)
from iomni.triton.tensors import AUDIO_ENCODER as AUDIO_MODEL
from iomni.triton.tensors import VISION_ENCODER as VISION_MODEL

log = logging.getLogger(__name__)
MAX_TILES = CONTRACTS[VISION_MODEL].max_batch_size


def _tensor(name: str, array: np.ndarray, dtype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


def _rpc_error(exc: grpc.RpcError, model: str) -> IomniError:
    code = exc.code().name if hasattr(exc, "code") else "UNAVAILABLE"
    details = exc.details() if hasattr(exc, "details") else str(exc)
    return translate(InferenceServerException(msg=details or str(exc), status=code), model)


def part_urls(vision: str | None, audio: str | None, speech: str | None) -> dict[str, str]:
    """`model_urls` for parts that live at their own address (the rest use the default)."""
    pairs = ((VISION_MODEL, vision), (AUDIO_MODEL, audio), (SPEECH_DECODER, speech))
    return {model: url for model, url in pairs if url}


class LLMRouter(Protocol):
    async def route(self, session_id: str) -> str: ...


def translate(exc: InferenceServerException, model: str) -> IomniError:
    """A Triton error as the project error a caller can act on, naming the model."""
    status = str(exc.status() or "")
    text = exc.message() or str(exc)
    # Stream errors arrive without a status; our models prefix the project's code instead.
    coded = re.match(r"^\[([A-Z_]+)\] (.*)$", text, flags=re.DOTALL)
    if coded:
        status, text = coded.group(1), coded.group(2)
    message = f"Triton model '{model}': {text}"
    if "INVALID_ARGUMENT" in status:
        return InvalidInput(message)
    if "DEADLINE_EXCEEDED" in status:
        return DeadlineExceeded(message)
    if "UNAVAILABLE" in status or "NOT_FOUND" in status or "not ready" in message:
        return Unavailable(message)
    return Internal(message)


class TritonParts:
    def __init__(
        self,
        url: str,
        model_id: str,
        placeholders: dict[int, str],
        timeout_s: float = 60.0,
        encoder_retries: int = 2,
        headers: dict[str, str] | None = None,
        llm_router: LLMRouter | None = None,
    ) -> None:
        """`placeholders` maps the prompt's placeholder token ids to the LLM inputs that fill
        them, e.g. {<IMG_CONTEXT> id: IMAGE_EMBEDS, <AUDIO_CONTEXT> id: AUDIO_EMBEDS}.
        `llm_router` picks the `llm` replica for a session (KV-cache affinity); without it
        every model is reached at `url`."""
        self.llm_router = llm_router
        self.url = url
        self.model_id = model_id
        self.placeholders = placeholders
        self.timeout_s = timeout_s
        self.encoder_retries = encoder_retries
        self.headers = headers or {}
        self.model_urls: dict[str, str] = {}  # model -> host:port when parts live apart
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    def client_at(self, url: str) -> grpcclient.InferenceServerClient:
        # Created on first use: a grpc.aio channel belongs to the event loop that made it.
        if url not in self._clients:
            self._clients[url] = grpcclient.InferenceServerClient(url)
        return self._clients[url]

    def url_for(self, model: str) -> str:
        return self.model_urls.get(model, self.url)

    def client_for(self, model: str) -> grpcclient.InferenceServerClient:
        return self.client_at(self.url_for(model))

    @property
    def client(self) -> grpcclient.InferenceServerClient:
        return self.client_at(self.url)

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()
        self._clients.clear()

    def call_headers(self) -> dict[str, str]:
        """Static headers plus the current W3C trace context."""
        return {**self.headers, **context_headers()}

    async def _llm_client(self, session_id: str) -> grpcclient.InferenceServerClient:
        if self.llm_router is None:
            return self.client_for(LLM)
        return self.client_at(await self.llm_router.route(session_id))

    async def check_ready(self, models: Sequence[str] = MODELS) -> None:
        """Raise Unavailable naming every model that is not ready (and where it was asked)."""
        missing = []
        for model in models:
            url = self.url_for(model)
            try:
                if not await self.client_at(url).is_model_ready(model):
                    missing.append(model)
            except InferenceServerException as exc:
                raise Unavailable(
                    f"Triton at {url} ({model}) cannot be reached: {exc.message()}"
                ) from exc
        if missing:
            where = sorted({self.url_for(m) for m in missing})
            raise Unavailable(
                f"Triton at {', '.join(where)}: model(s) not ready: {', '.join(missing)}"
            )

    async def _infer(self, model: str, inputs: list[InferInput], output: str) -> np.ndarray:
        for attempt in range(self.encoder_retries + 1):
            try:
                result = await self.client_for(model).infer(
                    model,
                    inputs,
                    outputs=[InferRequestedOutput(output)],
                    client_timeout=self.timeout_s,
                    headers=self.call_headers(),
                )
                return result.as_numpy(output)
            except InferenceServerException as exc:
                error = translate(exc, model)
                if not isinstance(error, Unavailable) or attempt == self.encoder_retries:
                    raise error from exc
                await asyncio.sleep(0.2 * 2**attempt)
        raise AssertionError("unreachable")

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        # The model batches at most MAX_TILES tiles per request (TensorRT profile too).
        pixels = pixel_values.float().numpy()
        parts = [
            self._infer(
                VISION_MODEL,
                [_tensor(PIXEL_VALUES, pixels[i : i + MAX_TILES], "FP32")],
                IMAGE_EMBEDS,
            )
            for i in range(0, len(pixels), MAX_TILES)
        ]
        return torch.from_numpy(np.concatenate(await asyncio.gather(*parts)))

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            by_length.setdefault(window.shape[-1], []).append(index)
        for indices in by_length.values():
            mel = np.stack([windows[i].float().numpy() for i in indices])
            embeds = await self._infer(AUDIO_MODEL, [_tensor(MEL, mel, "FP32")], AUDIO_EMBEDS)
            for i, rows in zip(indices, embeds, strict=True):
                out[i] = torch.from_numpy(rows.copy())
        return [t for t in out if t is not None]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        inputs = [_tensor(INPUT_IDS, np.asarray(request.input_ids, dtype=np.int64), "INT64")]
        for name, rows in self._media_inputs(request):
            inputs.append(_tensor(name, rows, "FP32"))
        params = {
            "temperature": request.params.temperature,
            "top_p": request.params.top_p,
            "top_k": request.params.top_k,
            "max_new_tokens": request.params.max_new_tokens,
            "session_id": request.session_id,
            "return_hidden": request.return_hidden,
        }
        if request.params.seed is not None:
            params["seed"] = request.params.seed
        outputs = [
            InferRequestedOutput(n)
            for n in (TOKEN_ID, HIDDEN, BATCH_SIZE, REUSED_TOKENS, FINISH_REASON)
        ]

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": LLM, "inputs": inputs, "outputs": outputs, "parameters": params}

        client = await self._llm_client(request.session_id)
        headers = {**self.call_headers(), **request.trace_headers}
        stream = client.stream_infer(requests(), headers=headers)
        first = True
        try:
            async for result, error in stream:
                if error is not None:
                    raise translate(error, LLM)
                token = int(result.as_numpy(TOKEN_ID)[0])
                hidden = result.as_numpy(HIDDEN)
                reused = int(result.as_numpy(REUSED_TOKENS)[0]) if first else 0
                first = False
                yield LLMStep(
                    token,
                    torch.from_numpy(hidden.copy()) if hidden.size else None,
                    reused_tokens=reused,
                )
                if result.as_numpy(FINISH_REASON)[0]:
                    return
        except grpc.RpcError as exc:  # transport failures arrive raw from the aio stream
            raise _rpc_error(exc, LLM) from exc
        finally:
            stream.cancel()

    def _media_inputs(self, request: GenerationRequest) -> list[tuple[str, np.ndarray]]:
        named = []
        for token_id, rows in request.media.items():
            name = self.placeholders.get(token_id)
            if name is None:
                raise InvalidInput(f"no Triton input for placeholder token {token_id}")
            named.append((name, rows.float().numpy()))
        return named

    async def open_speech(self, options: SpeechOptions) -> TritonSpeech:
        return TritonSpeech(self, options)


class TritonSpeech:
    """One spoken reply as a `speech_decoder` sequence (correlation id = turn id)."""

    def __init__(self, parts: TritonParts, options: SpeechOptions) -> None:
        self.parts = parts
        self.options = options
        self.sequence_id = options.sequence_id or f"speech-{uuid.uuid4().hex}"
        self.started = False
        self.ended = False

    async def _send(
        self, ids: Sequence[int], hidden: torch.Tensor, end: bool, discard: bool = False
    ) -> list[np.ndarray]:
        width = hidden.shape[-1] if hidden.numel() else 1
        inputs = [
            _tensor(TEXT_TOKEN_IDS, np.asarray([list(ids)], dtype=np.int64), "INT64"),
            _tensor(HIDDEN, hidden.float().numpy().reshape(1, len(ids), width), "FP32"),
        ]
        if not self.started and self.options.speaker_wav is not None:
            wav = np.array([[self.options.speaker_wav]], dtype=np.object_)
            inputs.append(_tensor(SPEAKER_WAV, wav, "BYTES"))
        request = {
            "model_name": SPEECH_DECODER,
            "inputs": inputs,
            "outputs": [InferRequestedOutput(AUDIO)],
            "sequence_id": self.sequence_id,
            "sequence_start": not self.started,
            "sequence_end": end,
            "parameters": {"seed": self.options.seed, "discard": discard},
        }
        self.started = True
        self.ended = self.ended or end

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield request

        chunks: list[np.ndarray] = []
        stream = self.parts.client_for(SPEECH_DECODER).stream_infer(
            requests(), headers=self.parts.call_headers()
        )
        try:
            async for result, error in stream:
                if error is not None:
                    raise translate(error, SPEECH_DECODER)
                audio = result.as_numpy(AUDIO).reshape(-1)
                if audio.size:
                    chunks.append(audio.copy())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        except grpc.RpcError as exc:  # transport failures arrive raw from the aio stream
            raise _rpc_error(exc, SPEECH_DECODER) from exc
        finally:
            stream.cancel()
        return chunks

    async def push_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> list[np.ndarray]:
        return await self._send(token_ids, hidden, end=False)

    async def finish(self) -> list[np.ndarray]:
        if self.ended:
            return []
        return await self._send([], torch.zeros(0), end=True)

    async def close(self) -> None:
        """Free the server's sequence state if the reply was not finished (barge-in)."""
        if self.started and not self.ended:
            try:
                await self._send([], torch.zeros(0), end=True, discard=True)
            except IomniError:
                log.warning("could not end speech sequence %s", self.sequence_id)
        self.ended = True


__all__ = ["TritonParts", "TritonSpeech"]
