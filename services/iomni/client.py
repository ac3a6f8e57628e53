"""A small Python client for the gateway, sync and async (used by the CLI, tests, load tests).

async with AsyncDialogueClient("localhost:50051", api_key) as client:
    session = await client.new_session()
    reply = await client.chat(session, turn_id, text="Hi", speech=True)
    reply.text, reply.audio (PCM16 bytes), reply.done
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from iomni.v1 import dialogue_pb2 as pb
from iomni.v1 import dialogue_pb2_grpc as pb_grpc

API_KEY_ENV = "IOMNI_API_KEY"
DEV_KEY_FILE = Path(".run/api_key")


def find_api_key(explicit: str | None = None) -> str | None:
    """--api-key, else IOMNI_API_KEY, else the local dev tenant's key written by `make up`."""
    if explicit:
        return explicit
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    return DEV_KEY_FILE.read_text().strip() if DEV_KEY_FILE.exists() else None


@dataclass
class Reply:
    session_id: str = ""
    turn_id: str = ""
    text: str = ""
    audio: bytearray = field(default_factory=bytearray)
    audio_chunks: int = 0
    done: pb.TurnDone | None = None
    events: list[pb.ConverseResponse] = field(default_factory=list)

    def add(self, response: pb.ConverseResponse) -> None:
        self.events.append(response)
        self.session_id = response.session_id or self.session_id
        self.turn_id = response.turn_id or self.turn_id
        kind = response.WhichOneof("payload")
        if kind == "text":
            self.text += response.text.text
        elif kind == "audio":
            self.audio.extend(response.audio.pcm)
            self.audio_chunks += 1
        elif kind == "done":
            self.done = response.done


def chat_request(
    session_id: str,
    turn_id: str,
    text: str = "",
    images: list[bytes] = (),  # type: ignore[assignment]
    audio: bytes | None = None,
    video: bytes | None = None,
    speech: bool = False,
    speaker_wav: bytes | None = None,
    **sampling,
) -> pb.ChatRequest:  # type: ignore[no-untyped-def]
    parts = [pb.Part(image=i) for i in images]
    if video is not None:
        parts.append(pb.Part(video=video))
    if audio is not None:
        parts.append(pb.Part(audio=audio))
    if text:
        parts.append(pb.Part(text=text))
    return pb.ChatRequest(
        session_id=session_id,
        turn_id=turn_id or uuid.uuid4().hex,
        parts=parts,
        sampling=pb.SamplingOptions(**sampling),
        output=pb.OutputOptions(speech=speech, speaker_wav=speaker_wav or b""),
    )


def _credentials(
    tls_ca: Path | None, client_cert: Path | None, client_key: Path | None
) -> grpc.ChannelCredentials | None:
    if tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=tls_ca.read_bytes(),
        private_key=client_key.read_bytes() if client_key else None,
        certificate_chain=client_cert.read_bytes() if client_cert else None,
    )


class AsyncDialogueClient:
    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls_ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        credentials = _credentials(tls_ca, client_cert, client_key)
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            ("grpc.max_send_message_length", 64 << 20),
        ]
        self.channel = (
            grpc.aio.secure_channel(target, credentials, options)
            if credentials
            else grpc.aio.insecure_channel(target, options)
        )
        self.stub = pb_grpc.DialogueStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    async def __aenter__(self) -> AsyncDialogueClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.channel.close()

    def chat_stream(
        self, request: pb.ChatRequest, timeout: float | None = None
    ) -> AsyncIterator[pb.ConverseResponse]:
        return self.stub.Chat(request, metadata=self.metadata, timeout=timeout)

    async def chat(
        self, session_id: str = "", turn_id: str = "", timeout: float | None = None, **kwargs
    ) -> Reply:  # type: ignore[no-untyped-def]
        reply = Reply()
        async for response in self.chat_stream(
            chat_request(session_id, turn_id, **kwargs), timeout
        ):
            reply.add(response)
        return reply

    def converse(
        self, requests: AsyncIterator[pb.ConverseRequest], timeout: float | None = None
    ) -> AsyncIterator[pb.ConverseResponse]:
        return self.stub.Converse(requests, metadata=self.metadata, timeout=timeout)

    def live(
        self,
        session_id: str = "",
        detection: pb.TurnDetection | None = None,
        speech: bool = True,
        timeout: float | None = None,
        **sampling,
    ) -> LiveStream:  # type: ignore[no-untyped-def]
        """A live-mode Converse stream: send microphone audio and camera frames as they come;
        read responses (speech events, committed turns, replies) as they arrive."""
        config = pb.SessionConfig(
            session_id=session_id,
            sampling=pb.SamplingOptions(**sampling),
            output=pb.OutputOptions(speech=speech),
            turn_detection=detection or pb.TurnDetection(mode=pb.TURN_DETECTION_SERVER_VAD),
        )
        return LiveStream(self, config, timeout)

    async def get_session(self, session_id: str) -> pb.Session:
        return await self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=self.metadata
        )

    async def delete_session(self, session_id: str) -> bool:
        response = await self.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=self.metadata
        )
        return response.deleted


class LiveStream:
    """One live conversation: `send_*` queue requests, iterating yields responses."""

    def __init__(
        self, client: AsyncDialogueClient, config: pb.SessionConfig, timeout: float | None
    ) -> None:
        self._outbox: asyncio.Queue[pb.ConverseRequest | None] = asyncio.Queue()
        self._outbox.put_nowait(pb.ConverseRequest(config=config))
        self.call = client.converse(self._requests(), timeout)

    async def _requests(self) -> AsyncIterator[pb.ConverseRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def send_audio(self, pcm: bytes, rate: int) -> None:
        audio = pb.UserAudio(data=pcm, encoding=pb.AUDIO_ENCODING_PCM16, sample_rate_hz=rate)
        self._outbox.put_nowait(pb.ConverseRequest(audio=audio))

    def send_frame(self, image: bytes) -> None:
        self._outbox.put_nowait(pb.ConverseRequest(frame=pb.CameraFrame(data=image)))

    def send_text(self, text: str) -> None:
        self._outbox.put_nowait(pb.ConverseRequest(text=pb.UserText(text=text)))

    def playback(self, turn_id: str, played_ms: int) -> None:
        position = pb.PlaybackPosition(turn_id=turn_id, played_ms=played_ms)
        self._outbox.put_nowait(pb.ConverseRequest(playback=position))

    def cancel(self) -> None:
        self._outbox.put_nowait(pb.ConverseRequest(cancel=pb.Cancel()))

    def end_of_turn(self) -> None:
        self._outbox.put_nowait(pb.ConverseRequest(end_of_turn=pb.EndOfTurn()))

    def close(self) -> None:
        """No more input; responses still in flight can be read."""
        self._outbox.put_nowait(None)

    def __aiter__(self) -> AsyncIterator[pb.ConverseResponse]:
        return self.call.__aiter__()


class DialogueClient:
    """Blocking twin of AsyncDialogueClient."""

    def __init__(
        self,
        target: str,
        api_key: str | None = None,
        tls_ca: Path | None = None,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        credentials = _credentials(tls_ca, client_cert, client_key)
        self.channel = (
            grpc.secure_channel(target, credentials)
            if credentials
            else grpc.insecure_channel(target)
        )
        self.stub = pb_grpc.DialogueStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def close(self) -> None:
        self.channel.close()

    def chat_stream(
        self, request: pb.ChatRequest, timeout: float | None = None
    ) -> Iterator[pb.ConverseResponse]:
        return self.stub.Chat(request, metadata=self.metadata, timeout=timeout)

    def chat(
        self, session_id: str = "", turn_id: str = "", timeout: float | None = None, **kwargs
    ) -> Reply:  # type: ignore[no-untyped-def]
        reply = Reply()
        for response in self.chat_stream(chat_request(session_id, turn_id, **kwargs), timeout):
            reply.add(response)
        return reply

    def get_session(self, session_id: str) -> pb.Session:
        return self.stub.GetSession(
            pb.GetSessionRequest(session_id=session_id), metadata=self.metadata
        )

    def delete_session(self, session_id: str) -> bool:
        return self.stub.DeleteSession(
            pb.DeleteSessionRequest(session_id=session_id), metadata=self.metadata
        ).deleted


__all__ = [
    "AsyncDialogueClient",
    "DialogueClient",
    "LiveStream",
    "Reply",
    "asyncio",
    "chat_request",
    "find_api_key",
]
