"""Dialogue messages: what a user sent and what the model said, part by part.

Media parts carry their bytes when they arrive and are afterwards referred to by the SHA-256 of
those bytes, so a stored history holds hashes, not media.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from iomni.errors import InvalidInput

Role = Literal["user", "assistant"]
# A "frame" is a still from a live camera: encoded like one video frame (one tile).
MEDIA_KINDS = ("image", "video", "audio", "frame")


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class TextPart:
    text: str
    type: Literal["text"] = "text"


@dataclass(frozen=True)
class MediaPart:
    """An image, a video, an audio clip or a camera frame. `data` is dropped once stored;
    `sha256` stays."""

    type: Literal["image", "video", "audio", "frame"]
    sha256: str
    data: bytes | None = field(default=None, repr=False, compare=False)
    # Frames sampled from a video; part of the identity of its embeddings.
    num_frames: int | None = None

    @classmethod
    def from_bytes(cls, kind: str, data: bytes, num_frames: int | None = None) -> MediaPart:
        if kind not in MEDIA_KINDS:
            raise InvalidInput(f"unknown media kind {kind!r}; expected one of {MEDIA_KINDS}")
        return cls(type=kind, sha256=content_hash(data), data=data, num_frames=num_frames)  # type: ignore[arg-type]

    @property
    def ident(self) -> str:
        """Identity of the encoded media: same bytes, kind and frame count."""
        return f"{self.type}:{self.sha256}:{self.num_frames or ''}"

    def without_data(self) -> MediaPart:
        return replace(self, data=None)


Part = TextPart | MediaPart


@dataclass(frozen=True)
class Message:
    role: Role
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))

    @property
    def media(self) -> tuple[MediaPart, ...]:
        return tuple(p for p in self.parts if isinstance(p, MediaPart))

    def to_dict(self) -> dict[str, Any]:
        parts: list[dict[str, Any]] = []
        for p in self.parts:
            if isinstance(p, TextPart):
                parts.append({"type": "text", "text": p.text})
            else:
                entry: dict[str, Any] = {"type": p.type, "sha256": p.sha256}
                if p.num_frames is not None:
                    entry["num_frames"] = p.num_frames
                parts.append(entry)
        return {"role": self.role, "parts": parts}

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Message:
        role = raw.get("role")
        if role not in ("user", "assistant"):
            raise InvalidInput(f"message role must be 'user' or 'assistant', got {role!r}")
        return cls(role=role, parts=tuple(part_from_dict(p) for p in raw.get("parts", [])))


def part_from_dict(raw: dict[str, Any]) -> Part:
    kind = raw.get("type")
    if kind == "text":
        return TextPart(text=str(raw.get("text", "")))
    if kind in MEDIA_KINDS:
        sha = raw.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64:
            raise InvalidInput(f"{kind} part needs a 64-character sha256, got {sha!r}")
        return MediaPart(type=kind, sha256=sha, num_frames=raw.get("num_frames"))
    raise InvalidInput(f"unknown content part type {kind!r}; supported: text, image, video, audio")
