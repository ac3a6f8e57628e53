"""The `iomni.v1` protobuf wire ⇄ the turn core, for the front doors that speak it (the gRPC
gateway and the Kafka worker). Nothing below the front doors imports generated code."""

from __future__ import annotations

from iomni.engine.events import AudioChunk, TextDelta, Usage
from iomni.errors import InvalidInput
from iomni.live.detector import SpeechStarted, SpeechStopped, TurnDetection
from iomni.live.session import (
    Interrupted,
    LiveEvent,
    LiveSettings,
    LiveWarning,
    ReplyStarted,
    ReplyTruncated,
    TurnCommitted,
)
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.sampling import SamplingParams
from iomni.parts import SpeechOptions
from iomni.turns.runner import USAGE_FIELDS, TurnFinished, TurnOutput
from iomni.v1 import dialogue_pb2 as pb

STOP_REASONS = {
    "eos": pb.STOP_REASON_EOS,
    "length": pb.STOP_REASON_LENGTH,
    "cancelled": pb.STOP_REASON_CANCELLED,
}


def sampling_params(options: pb.SamplingOptions) -> SamplingParams:
    defaults = SamplingParams()

    def pick(name: str, default):  # type: ignore[no-untyped-def]
        return getattr(options, name) if options.HasField(name) else default

    return SamplingParams(
        temperature=pick("temperature", defaults.temperature),
        top_p=pick("top_p", defaults.top_p),
        top_k=pick("top_k", defaults.top_k),
        max_new_tokens=pick("max_new_tokens", defaults.max_new_tokens),
        seed=pick("seed", None),
    ).validate()


def speech_options(output: pb.OutputOptions) -> SpeechOptions | None:
    if not output.speech:
        return None
    return SpeechOptions(speaker_wav=output.speaker_wav or None, seed=output.speech_seed)


def chat_message(parts: list[pb.Part]) -> Message:
    out: list[TextPart | MediaPart] = []
    for part in parts:
        kind = part.WhichOneof("part")
        if kind == "text":
            out.append(TextPart(part.text))
        elif kind in ("image", "audio", "video"):
            frames = (part.video_frames or None) if kind == "video" else None
            out.append(MediaPart.from_bytes(kind, getattr(part, kind), num_frames=frames))
        else:
            raise InvalidInput(
                f"unsupported part {kind!r} in a turn request; send text, image, audio or video"
            )
    return Message("user", tuple(out))


def usage(value: Usage) -> pb.Usage:
    return pb.Usage(**{k: getattr(value, k) for k in USAGE_FIELDS})


def turn_done(finished: TurnFinished) -> pb.TurnDone:
    return pb.TurnDone(
        stop_reason=STOP_REASONS.get(finished.stop_reason, pb.STOP_REASON_UNSPECIFIED),
        usage=usage(finished.usage),
        timings_ms={k: float(v) for k, v in finished.timings_ms.items()},
        replayed=finished.replayed,
        text=finished.text,
    )


def response(session_id: str, turn_id: str, output: TurnOutput) -> pb.ConverseResponse:
    """One turn output as the API's response message."""
    message = pb.ConverseResponse(session_id=session_id, turn_id=turn_id)
    if isinstance(output, TextDelta):
        message.text.CopyFrom(pb.TextDelta(text=output.text, token_index=output.token_index))
    elif isinstance(output, AudioChunk):
        message.audio.CopyFrom(
            pb.AudioChunk(
                pcm=output.pcm, sequence=output.sequence, sample_rate_hz=output.sample_rate
            )
        )
    else:
        message.done.CopyFrom(turn_done(output))
    return message


def history_message(message: Message) -> pb.Message:
    parts = []
    for part in message.parts:
        if isinstance(part, TextPart):
            parts.append(pb.Part(text=part.text))
        else:
            parts.append(
                pb.Part(
                    media_ref=pb.MediaRef(kind=part.type, sha256=part.sha256),
                    video_frames=part.num_frames or 0,
                )
            )
    return pb.Message(role=message.role, parts=parts)


def live_settings(config: pb.TurnDetection) -> LiveSettings | None:
    """Live-mode settings from a session config; None for manual turns."""
    if config.mode != pb.TURN_DETECTION_SERVER_VAD:
        return None
    defaults, live = TurnDetection(), LiveSettings()

    def pick(name: str, default):  # type: ignore[no-untyped-def]
        return getattr(config, name) if config.HasField(name) else default

    detection = TurnDetection(
        threshold=pick("threshold", defaults.threshold),
        min_speech_ms=pick("min_speech_ms", defaults.min_speech_ms),
        end_of_speech_ms=pick("end_of_speech_ms", defaults.end_of_speech_ms),
        silence_ms=pick("silence_ms", defaults.silence_ms),
        prefix_padding_ms=pick("prefix_padding_ms", defaults.prefix_padding_ms),
    )
    if detection.end_of_speech_ms > detection.silence_ms and not config.HasField(
        "end_of_speech_ms"
    ):
        detection = TurnDetection(**{**vars(detection), "end_of_speech_ms": detection.silence_ms})
    return LiveSettings(
        detection=detection,
        early_start=pick("early_start", live.early_start),
        interrupt_response=pick("interrupt_response", live.interrupt_response),
        max_frames=pick("max_frames", live.max_frames),
    ).validate()


BARGE_IN = {"voice": pb.INTERRUPTED_BY_VOICE, "client": pb.INTERRUPTED_BY_CLIENT}


def live_response(
    session_id: str, turn_id: str, event: LiveEvent | TurnOutput
) -> pb.ConverseResponse:
    """A live-session event (or a turn output) as the API's response message."""
    if isinstance(event, TextDelta | AudioChunk | TurnFinished):
        return response(session_id, turn_id, event)
    message = pb.ConverseResponse(session_id=session_id, turn_id=turn_id)
    if isinstance(event, SpeechStarted):
        message.speech_started.CopyFrom(
            pb.SpeechStarted(audio_start_ms=event.audio_start_ms, resumed=event.resumed)
        )
    elif isinstance(event, SpeechStopped):
        message.speech_stopped.CopyFrom(pb.SpeechStopped(audio_end_ms=event.audio_end_ms))
    elif isinstance(event, ReplyStarted):
        message.committed.CopyFrom(pb.TurnCommitted())
    elif isinstance(event, TurnCommitted):
        message.committed.CopyFrom(
            pb.TurnCommitted(
                audio_start_ms=event.audio_start_ms,
                audio_end_ms=event.audio_end_ms,
                frames=event.frames,
            )
        )
    elif isinstance(event, Interrupted):
        message.interrupted.CopyFrom(pb.Interrupted(by=BARGE_IN[event.by]))
    elif isinstance(event, ReplyTruncated):
        message.truncated.CopyFrom(pb.ReplyTruncated(played_ms=event.played_ms, text=event.text))
    elif isinstance(event, LiveWarning):
        message.warning.CopyFrom(pb.Warning(code=event.code.grpc_status, message=event.message))
    return message
