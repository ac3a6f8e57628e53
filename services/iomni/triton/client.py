"""`TritonParts`: the engine's `ModelParts` over Triton's gRPC API. Encoder and LLM requests are
built here from tritonclient's protobufs and sent as bytes (large ones built off the event
loop); health checks and the speech stream use tritonclient's asyncio client.

Encoders are plain requests (retried on UNAVAILABLE: they are idempotent); the LLM and the
speech decoder are streams. Closing the LLM generator cancels its stream, which Triton turns
into `is_cancelled()` on the server within milliseconds; the batcher drops the sequence before
its next decode step.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import numpy as np
import torch
import tritonclient.grpc.aio as grpcclient
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, service_pb2
from tritonclient.grpc.aio import MAX_GRPC_MESSAGE_SIZE
from tritonclient.utils import InferenceServerException

from iomni import background
from iomni.errors import ErrorCode, InvalidInput, IomniError, Unavailable, error_for
from iomni.parts import ChunkCallback, GenerationRequest, LLMStep, SpeechOptions
from iomni.telemetry.tracing import context_headers
from iomni.triton.tensors import (
    AUDIO,
    AUDIO_EMBEDS,
    CONTRACTS,
    ERROR_CODE,
    ERROR_MESSAGE,
    FINISH_REASON,
    HIDDEN,
    IMAGE_EMBEDS,
    INPUT_IDS,
    LLM,
    MEL,
    MODELS,
    PIXEL_VALUES,
    PREFILL_MS,
    REUSED_TOKENS,
    SPEAKER_WAV,
    SPEECH_DECODER,
    TEXT_TOKEN_IDS,
    TOKEN_ID,
)
from iomni.triton.tensors import AUDIO_ENCODER as AUDIO_MODEL
from iomni.triton.tensors import VISION_ENCODER as VISION_MODEL

log = logging.getLogger(__name__)
_BACKGROUND: set[asyncio.Task] = set()  # fire-and-forget calls, referenced until done
MAX_TILES = CONTRACTS[VISION_MODEL].max_batch_size
# Tiles per vision request. A request is serialized off the event loop, but the gRPC call
# still copies it once on the loop: 7 tiles (17 MB) stalled the loop 28-36 ms unloaded (and
# 73-181 ms while 4 sessions sent images, which a playing reply heard as a late chunk);
# 2-tile requests sent together stall it 4-10 ms and finish sooner.
TILES_PER_REQUEST = 2
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MODEL_STREAM_INFER = "/inference.GRPCInferenceService/ModelStreamInfer"
LLM_OUTPUTS = (
    TOKEN_ID,
    HIDDEN,
    REUSED_TOKENS,
    PREFILL_MS,
    FINISH_REASON,
    ERROR_CODE,
    ERROR_MESSAGE,
)
# Reconnect within a second of a Triton restart (gRPC's default backoff grows to 120 s, so the
# first turns after a restart would fail although the server is back).
CHANNEL_ARGS = [
    ("grpc.max_send_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.max_receive_message_length", MAX_GRPC_MESSAGE_SIZE),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def _tensor(name: str, array: np.ndarray, dtype: str) -> InferInput:
    tensor = InferInput(name, list(array.shape), dtype)
    tensor.set_data_from_numpy(array)
    return tensor


OFFLOAD_BYTES = 1 << 20  # a larger LLM request is built off the event loop
STREAM_END_S = 10.0  # a finished stream's end, waited for before cancelling it


def _request(
    model: str,
    inputs: Sequence[tuple[str, np.ndarray, str]],
    outputs: Sequence[str],
    params: dict[str, Any] | None = None,
) -> bytes:
    """A ModelInfer request, serialized: built where the caller runs it (off the event loop
    for large tensors), where a tritonclient call would build and serialize it (two copies of
    tens of MB) on the loop."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, array, dtype in inputs:
        request.inputs.add(name=name, datatype=dtype, shape=array.shape)
        request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    for name in outputs:
        request.outputs.add(name=name)
    for key, value in (params or {}).items():
        parameter = request.parameters[key]
        if isinstance(value, bool):  # before int: a bool is an int
            parameter.bool_param = value
        elif isinstance(value, int):
            parameter.int64_param = value
        elif isinstance(value, float):
            parameter.double_param = value
        else:
            parameter.string_param = str(value)
    return request.SerializeToString()


class LLMRouter(Protocol):
    async def route(self, session_id: str) -> str: ...


def translate(exc: InferenceServerException | grpc.RpcError, model: str) -> IomniError:
    """A failed Triton call as the project error, by its gRPC status, naming the model."""
    if isinstance(exc, InferenceServerException):
        status, text = str(exc.status() or ""), exc.message() or str(exc)
    else:
        code = exc.code() if hasattr(exc, "code") else None
        status = code.name if code is not None else "UNAVAILABLE"
        text = (exc.details() if hasattr(exc, "details") else None) or str(exc)
    # A stream that broke (server gone) has no status: the server is not answering.
    code = ErrorCode.from_grpc_status(status) if status else ErrorCode.UNAVAILABLE
    return error_for(code, f"Triton model '{model}': {text}")


def stream_error(result: InferResult, model: str) -> IomniError | None:
    """The structured error of a streaming model's final response, if it is one."""
    code = result.as_numpy(ERROR_CODE)
    if code is None:
        return None
    message = result.as_numpy(ERROR_MESSAGE)
    text = message.reshape(-1)[0].decode() if message is not None else "failed"
    return error_for(
        ErrorCode.parse(code.reshape(-1)[0].decode()), f"Triton model '{model}': {text}"
    )


class TritonParts:
    def __init__(
        self,
        url: str,
        model_id: str,
        placeholders: dict[int, str],
        timeout_s: float = 60.0,
        retries: int = 2,
        headers: dict[str, str] | None = None,
        llm_router: LLMRouter | None = None,
        model_urls: dict[str, str] | None = None,
    ) -> None:
        """`placeholders` maps the prompt's placeholder token ids to the LLM inputs that fill
        them, e.g. {<IMG_CONTEXT> id: IMAGE_EMBEDS, <AUDIO_CONTEXT> id: AUDIO_EMBEDS}.
        `llm_router` picks the `llm` replica for a session (KV-cache affinity); `model_urls`
        places parts at their own addresses; the rest are reached at `url`. Requests that fail
        with UNAVAILABLE before any result are retried `retries` times."""
        self.llm_router = llm_router
        self.url = url
        self.model_id = model_id
        self.placeholders = placeholders
        self.timeout_s = timeout_s
        self.retries = retries
        self.headers = headers or {}
        self.model_urls: dict[str, str] = dict(model_urls or {})
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}  # for pre-serialized requests
        self._model_infer: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
        self._model_stream_infer: dict[str, grpc.aio.StreamStreamMultiCallable] = {}

    def client_at(self, url: str) -> grpcclient.InferenceServerClient:
        # Created on first use: a grpc.aio channel belongs to the event loop that made it.
        if url not in self._clients:
            self._clients[url] = grpcclient.InferenceServerClient(url, channel_args=CHANNEL_ARGS)
        return self._clients[url]

    def _channel_at(self, url: str) -> grpc.aio.Channel:
        """The channel for already serialized requests (made on first use, like a client)."""
        if url not in self._channels:
            self._channels[url] = grpc.aio.insecure_channel(url, options=CHANNEL_ARGS)
        return self._channels[url]

    def _model_infer_at(self, url: str) -> grpc.aio.UnaryUnaryMultiCallable:
        """ModelInfer taking an already serialized request."""
        if url not in self._model_infer:
            self._model_infer[url] = self._channel_at(url).unary_unary(
                MODEL_INFER,
                request_serializer=None,  # the request is already bytes
                response_deserializer=service_pb2.ModelInferResponse.FromString,
            )
        return self._model_infer[url]

    def _model_stream_infer_at(self, url: str) -> grpc.aio.StreamStreamMultiCallable:
        """ModelStreamInfer taking already serialized requests."""
        if url not in self._model_stream_infer:
            self._model_stream_infer[url] = self._channel_at(url).stream_stream(
                MODEL_STREAM_INFER,
                request_serializer=None,
                response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
            )
        return self._model_stream_infer[url]

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
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        self._model_infer.clear()
        self._model_stream_infer.clear()

    def _metadata(self, extra: dict[str, str] | None = None) -> tuple[tuple[str, str], ...]:
        # gRPC metadata keys are lowercase (tritonclient lowers them for its own calls).
        headers = {**self.call_headers(), **(extra or {})}
        return tuple((key.lower(), value) for key, value in headers.items())

    def call_headers(self) -> dict[str, str]:
        """Static headers plus the current W3C trace context."""
        return {**self.headers, **context_headers()}

    async def _llm_url(self, session_id: str) -> str:
        if self.llm_router is None:
            return self.url_for(LLM)
        return await self.llm_router.route(session_id)

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

    async def _backoff(self, attempt: int, error: IomniError) -> None:
        if not isinstance(error, Unavailable) or attempt == self.retries:
            raise error
        await asyncio.sleep(0.2 * 2**attempt)

    async def _infer(self, model: str, name: str, array: np.ndarray, output: str) -> np.ndarray:
        """An encoder request (one FP32 input): serialized off the event loop, sent as bytes."""
        request = await background.run(_request, model, [(name, array, "FP32")], (output,))
        call = self._model_infer_at(self.url_for(model))
        for attempt in range(self.retries + 1):
            try:
                response = await call(request, timeout=self.timeout_s, metadata=self._metadata())
                return InferResult(response).as_numpy(output)
            except grpc.RpcError as exc:
                await self._backoff(attempt, translate(exc, model))
        raise AssertionError("unreachable")

    async def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pixels = pixel_values.float().numpy()
        step = min(TILES_PER_REQUEST, MAX_TILES)  # the model batches at most MAX_TILES
        parts = [
            self._infer(VISION_MODEL, PIXEL_VALUES, pixels[i : i + step], IMAGE_EMBEDS)
            for i in range(0, len(pixels), step)
        ]
        return torch.from_numpy(np.concatenate(await asyncio.gather(*parts)))

    async def encode_audio(self, windows: list[torch.Tensor]) -> list[torch.Tensor]:
        out: list[torch.Tensor | None] = [None] * len(windows)
        by_length: dict[int, list[int]] = {}
        for index, window in enumerate(windows):
            by_length.setdefault(window.shape[-1], []).append(index)
        for indices in by_length.values():
            mel = np.stack([windows[i].float().numpy() for i in indices])
            embeds = await self._infer(AUDIO_MODEL, MEL, mel, AUDIO_EMBEDS)
            for i, rows in zip(indices, embeds, strict=True):
                out[i] = torch.from_numpy(rows.copy())
        return [t for t in out if t is not None]

    async def generate(self, request: GenerationRequest) -> AsyncIterator[LLMStep]:
        inputs = [(INPUT_IDS, np.asarray(request.input_ids, dtype=np.int64), "INT64")]
        inputs += [(name, rows, "FP32") for name, rows in self._media_inputs(request)]
        params: dict[str, Any] = {
            "temperature": request.params.temperature,
            "top_p": request.params.top_p,
            "top_k": request.params.top_k,
            "max_new_tokens": request.params.max_new_tokens,
            "session_id": request.session_id,
            "return_hidden": request.return_hidden,
            "stop_ids": ",".join(str(token) for token in request.stop_ids),
        }
        if request.params.seed is not None:
            params["seed"] = request.params.seed
        if sum(array.nbytes for _, array, _ in inputs) > OFFLOAD_BYTES:
            call = await background.run(_request, LLM, inputs, LLM_OUTPUTS, params)
        else:
            call = _request(LLM, inputs, LLM_OUTPUTS, params)
        metadata = self._metadata(request.trace_headers)
        for attempt in range(self.retries + 1):
            # Routed again on each attempt: once a draining or dead replica is no longer ready
            # (its endpoint leaves the ring), the retry goes to another.
            url = await self._llm_url(request.session_id)
            steps = 0
            try:
                async for step in self._llm_stream(url, call, metadata):
                    steps += 1
                    yield step
                return
            except Unavailable as exc:
                if steps:  # tokens already went out: a retry would repeat them
                    raise
                await self._backoff(attempt, exc)

    async def _llm_stream(
        self, url: str, call: bytes, metadata: tuple[tuple[str, str], ...]
    ) -> AsyncIterator[LLMStep]:
        stream = self._model_stream_infer_at(url)(iter([call]), metadata=metadata)
        answered = False  # the model's final response came: tritonserver ends the stream
        try:
            async for response in stream:
                if response.error_message:
                    raise translate(InferenceServerException(msg=response.error_message), LLM)
                result = InferResult(response.infer_response)
                failed = stream_error(result, LLM)
                answered = failed is not None or result.as_numpy(FINISH_REASON) is not None
                if failed is not None:
                    raise failed
                yield _llm_step(result)
                if answered:
                    return
            raise Unavailable(f"the {LLM} stream at {url} ended before its final response")
        except grpc.RpcError as exc:  # transport failures arrive raw from the aio stream
            raise translate(exc, LLM) from exc
        finally:
            if answered:  # the turn need not wait for the stream's end
                _keep(asyncio.ensure_future(_read_to_end(stream)))
            else:
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


def _llm_step(result: InferResult) -> LLMStep:
    hidden = result.as_numpy(HIDDEN)
    prefill = result.as_numpy(PREFILL_MS)
    reused = result.as_numpy(REUSED_TOKENS)
    return LLMStep(
        int(result.as_numpy(TOKEN_ID)[0]),
        torch.from_numpy(hidden.copy()) if hidden is not None and hidden.size else None,
        timings_ms={"prefill": float(prefill[0])} if prefill is not None else {},
        reused_tokens=int(reused[0]) if reused is not None else 0,
    )


class TritonSpeech:
    """One spoken reply as a `speech_decoder` sequence (correlation id = turn id), over one gRPC
    stream. Requests are pipelined: each call sends at once, without waiting for the answers
    to earlier ones (so the decoder has the reply's next text queued when a chunk is done),
    and is answered in order. Calls must be made in the reply's order; tasks created in that
    order qualify, since asyncio starts tasks in the order they were created."""

    def __init__(self, parts: TritonParts, options: SpeechOptions) -> None:
        self.parts = parts
        self.options = options
        self.sequence_id = options.sequence_id or f"speech-{uuid.uuid4().hex}"
        self.started = False
        self.ended = False
        self._outbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._answers: collections.deque[_Answer] = collections.deque()
        self._reader: asyncio.Task | None = None
        self._last_sent = False  # END went out: the stream ends with its answer

    async def _send(
        self,
        ids: Sequence[int],
        hidden: torch.Tensor,
        end: bool,
        discard: bool = False,
        on_chunk: ChunkCallback | None = None,
    ) -> list[np.ndarray]:
        width = hidden.shape[-1] if hidden.numel() else 1
        inputs = [
            _tensor(TEXT_TOKEN_IDS, np.asarray([list(ids)], dtype=np.int64), "INT64"),
            _tensor(HIDDEN, hidden.float().numpy().reshape(1, len(ids), width), "FP32"),
        ]
        if not self.started and self.options.speaker_wav is not None:
            wav = np.array([[self.options.speaker_wav]], dtype=np.object_)
            inputs.append(_tensor(SPEAKER_WAV, wav, "BYTES"))
        if self._last_sent or (self._reader is not None and self._reader.done()):
            raise Unavailable(f"speech sequence {self.sequence_id} is closed or its stream failed")
        answer = _Answer(asyncio.get_running_loop().create_future(), on_chunk)
        self._answers.append(answer)
        self._outbox.put_nowait(
            {
                "model_name": SPEECH_DECODER,
                "inputs": inputs,
                "outputs": [InferRequestedOutput(n) for n in (AUDIO, ERROR_CODE, ERROR_MESSAGE)],
                "sequence_id": self.sequence_id,
                "sequence_start": not self.started,
                "sequence_end": end,
                "parameters": {"seed": self.options.seed, "discard": discard},
            }
        )
        self.started = True
        if end:
            self.ended = self._last_sent = True
            self._outbox.put_nowait(None)  # the last request: the stream closes after it
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read())
            _keep(self._reader)
        return await asyncio.shield(answer.future)

    async def _read(self) -> None:
        """Answer the calls in order from the stream's responses; the last response of a
        request carries Triton's final flag (an error response is final too). After a discard
        the answers of the superseded requests can overtake the one being rendered; the reply
        is abandoned by then and only their count matters."""

        async def requests() -> AsyncIterator[dict[str, Any]]:
            while (request := await self._outbox.get()) is not None:
                yield request

        stream = self.parts.client_for(SPEECH_DECODER).stream_infer(
            requests(), headers=self.parts.call_headers()
        )
        try:
            async for result, error in stream:
                if error is not None:
                    raise translate(error, SPEECH_DECODER)
                if not self._answers:
                    continue
                answer = self._answers[0]
                failed = stream_error(result, SPEECH_DECODER)
                audio = result.as_numpy(AUDIO) if failed is None else None
                if audio is not None and audio.size:
                    answer.add(audio.reshape(-1).copy())
                if failed is not None or _final(result):
                    self._answers.popleft().settle(failed)
                    if not self._answers and self._last_sent:
                        await _read_to_end(stream)
                        return
        except grpc.RpcError as exc:  # transport failures arrive raw from the aio stream
            self._fail_all(translate(exc, SPEECH_DECODER))
        except IomniError as exc:
            self._fail_all(exc)
        finally:
            stream.cancel()
            self._fail_all(Unavailable("the speech decoder's stream ended early"))

    def _fail_all(self, error: IomniError) -> None:
        while self._answers:
            self._answers.popleft().settle(error)

    async def push_text(
        self,
        token_ids: Sequence[int],
        hidden: torch.Tensor,
        on_chunk: ChunkCallback | None = None,
    ) -> list[np.ndarray]:
        return await self._send(token_ids, hidden, end=False, on_chunk=on_chunk)

    async def finish(self, on_chunk: ChunkCallback | None = None) -> list[np.ndarray]:
        if self.ended:
            return []
        return await self._send([], torch.zeros(0), end=True, on_chunk=on_chunk)

    async def close(self) -> None:
        """Free the server's sequence state if the reply was not finished (barge-in). The
        discard goes out in the background on the reply's stream (the decoder answers the
        text still queued as cancelled); the turn's `done` does not wait for it."""
        if self.started and not self.ended:
            _keep(asyncio.ensure_future(self._discard()))
        self.ended = True

    async def _discard(self) -> None:
        try:
            await self._send([], torch.zeros(0), end=True, discard=True)
        except IomniError:
            log.warning("could not end speech sequence %s", self.sequence_id)


@dataclass
class _Answer:
    """The audio of one speech request, gathered until its final response."""

    future: asyncio.Future[list[np.ndarray]]
    on_chunk: ChunkCallback | None = None
    chunks: list[np.ndarray] = field(default_factory=list)

    def add(self, chunk: np.ndarray) -> None:
        self.chunks.append(chunk)
        if self.on_chunk is not None and not self.future.done():
            self.on_chunk(chunk)

    def settle(self, error: IomniError | None) -> None:
        if self.future.done():
            return
        if error is None:
            self.future.set_result(self.chunks)
        else:
            self.future.set_exception(error)
            self.future.exception()  # retrieved: a call abandoned by a barge-in is not an error


def _final(result: InferResult) -> bool:
    return bool(result.get_response().parameters["triton_final_response"].bool_param)


async def _read_to_end(stream: Any) -> None:
    """Read a stream whose last request has its final response until tritonserver ends it.
    Cancelling it then instead races the server's own end of the stream, and a stream
    cancelled in that window stays in tritonserver's memory (2.51: ~10 KB per 24-token reply,
    so ~1 GB per 100,000 turns; docs/triton.md). Cancelled if it does not end in time."""
    try:
        async with asyncio.timeout(STREAM_END_S):
            async for _ in stream:
                pass
    except (TimeoutError, grpc.RpcError):
        stream.cancel()


def _keep(task: asyncio.Task) -> None:
    """Reference a fire-and-forget task until it is done."""
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


__all__ = ["TritonParts", "TritonSpeech"]
