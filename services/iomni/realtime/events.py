"""Server events of the OpenAI Realtime protocol, built with the `openai` package's own types
(`openai.types.realtime`): every event this server sends validates against the contract."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from openai.types import realtime as rt
from openai.types.realtime import (
    realtime_conversation_item_assistant_message as assistant_message,
)
from openai.types.realtime import realtime_conversation_item_user_message as user_message
from openai.types.realtime import realtime_response_usage as usage_types

from iomni.engine.events import Usage

EXTENSION_FRAME = "iomni.input_frame.append"  # a camera frame: {"image": base64 JPEG/PNG}


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:24]}"


def dump(model: Any) -> dict:
    return model.model_dump(mode="json", exclude_none=True)


def event(model_type: type, **fields: Any) -> dict:
    """A server event: the model validates the fields; the dict is what goes on the wire."""
    return dump(model_type(event_id=new_id("event"), **fields))


def user_item(item_id: str, kinds: list[str], texts: list[str]) -> rt.ConversationItem:
    content = [user_message.Content(type=kind) for kind in kinds]  # type: ignore[arg-type]
    content += [user_message.Content(type="input_text", text=t) for t in texts]
    return rt.RealtimeConversationItemUserMessage(
        id=item_id,
        object="realtime.item",
        type="message",
        role="user",
        status="completed",
        content=content,
    )


def assistant_item(item_id: str, audio: bool, text: str | None, status: str) -> rt.ConversationItem:
    if text is None:
        content = []
    elif audio:
        content = [assistant_message.Content(type="output_audio", transcript=text)]
    else:
        content = [assistant_message.Content(type="output_text", text=text)]
    return rt.RealtimeConversationItemAssistantMessage(
        id=item_id,
        object="realtime.item",
        type="message",
        role="assistant",
        status=status,  # type: ignore[arg-type]
        content=content,
    )


def usage(value: Usage) -> rt.RealtimeResponseUsage:
    text_in = max(0, value.prompt_tokens - value.audio_tokens - value.image_tokens)
    return rt.RealtimeResponseUsage(
        input_tokens=value.prompt_tokens,
        output_tokens=value.completion_tokens + value.speech_tokens,
        total_tokens=value.prompt_tokens + value.completion_tokens + value.speech_tokens,
        input_token_details=usage_types.RealtimeResponseUsageInputTokenDetails(
            cached_tokens=value.prompt_tokens_reused,
            text_tokens=text_in,
            audio_tokens=value.audio_tokens,
            image_tokens=value.image_tokens,
        ),
        output_token_details=usage_types.RealtimeResponseUsageOutputTokenDetails(
            text_tokens=value.completion_tokens, audio_tokens=value.speech_tokens
        ),
    )


def audio_delta(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def error(kind: str, message: str, code: str | None = None, event_id: str | None = None) -> dict:
    """An `error` event; `kind` is the error type (invalid_request_error, server_error)."""
    return event(
        rt.RealtimeErrorEvent,
        type="error",
        error=rt.RealtimeError(type=kind, code=code, message=message, event_id=event_id),
    )
