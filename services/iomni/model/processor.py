"""Processor: media to model inputs, and a conversation to the ChatML prompt token ids.

The prompt is built as segments (text, or a placeholder token repeated n times) so that media
placeholders are exact token runs, never re-tokenised text.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from iomni.errors import CheckpointError, InvalidInput
from iomni.model.conversation import MediaPart, Message, TextPart
from iomni.model.media import (
    AudioFeatureExtractor,
    MediaLimits,
    audio_token_count,
    dynamic_tiles,
    load_audio,
    load_image,
    load_video_frames,
    split_audio_windows,
    tiles_to_tensor,
)
from iomni.model.tokenizer import Tokenizer

# The system prompt InteractiveOmni needs for speech output (README of the real model).
SPEECH_SYSTEM_PROMPT = (
    "You are a highly advanced multimodal conversational AI designed for human-like "
    "interaction. You can perceive auditory, visual, speech, and textual inputs, and "
    "generate text and speech."
)
# Turn separators per conversation template (InternVL's `conversation.py`).
TEMPLATE_SEPARATORS = {
    "internvl2_5": "<|im_end|>\n",
    "Hermes-2": "<|im_end|>",
    "internlm2-chat": "<|im_end|>",
}
DEFAULT_VIDEO_FRAMES = 8


class PlainText(str):
    """Text from a user or the model: special-token strings in it are NOT special tokens."""


Segment = str | tuple[int, int]  # template text, PlainText, or (token id, repeat count)


@dataclass(frozen=True)
class VisionSettings:
    image_size: int
    num_image_token: int
    min_tiles: int
    max_tiles: int
    use_thumbnail: bool
    dynamic: bool


@dataclass
class PreparedImage:
    pixel_values: torch.Tensor  # (tiles, 3, H, W)


@dataclass
class PreparedAudio:
    windows: list[torch.Tensor]  # each (128, frames)
    num_tokens: int


class Processor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        vision: VisionSettings,
        audio: AudioFeatureExtractor,
        template: str = "internvl2_5",
        limits: MediaLimits | None = None,
        system_prompt: str = SPEECH_SYSTEM_PROMPT,
    ) -> None:
        if template not in TEMPLATE_SEPARATORS:
            raise CheckpointError(
                f"conversation template {template!r} is not supported; "
                f"known: {', '.join(TEMPLATE_SEPARATORS)}"
            )
        self.tokenizer = tokenizer
        self.vision = vision
        self.audio = audio
        self.separator = TEMPLATE_SEPARATORS[template]
        self.limits = limits or MediaLimits()
        self.system_prompt = system_prompt

    @classmethod
    def from_checkpoint(cls, path: Path, limits: MediaLimits | None = None) -> Processor:
        from iomni.model.config import InteractiveOmniConfig

        config = InteractiveOmniConfig.from_file(path / "config.json")
        vision = VisionSettings(
            image_size=config.image_size,
            num_image_token=config.num_image_token,
            min_tiles=int(config.min_dynamic_patch),
            max_tiles=int(config.max_dynamic_patch),
            use_thumbnail=bool(config.use_thumbnail),
            dynamic=bool(config.dynamic_image_size),
        )
        return cls(
            Tokenizer.from_dir(path),
            vision,
            AudioFeatureExtractor.from_dir(path),
            template=config.template,
            limits=limits,
        )

    # -- media ------------------------------------------------------------------------------

    def prepare_image(self, data: bytes, max_tiles: int | None = None) -> PreparedImage:
        image = load_image(data, self.limits)
        v = self.vision
        tiles = (
            dynamic_tiles(
                image,
                tile_size=v.image_size,
                min_num=v.min_tiles,
                max_num=max_tiles or v.max_tiles,
                use_thumbnail=v.use_thumbnail,
            )
            if v.dynamic
            else [image]
        )
        return PreparedImage(tiles_to_tensor(tiles, tile_size=v.image_size))

    def prepare_video(self, data: bytes, num_frames: int) -> PreparedImage:
        if not 1 <= num_frames <= 64:
            raise InvalidInput(f"video frames must be between 1 and 64, got {num_frames}")
        frames = load_video_frames(data, num_frames, self.limits)
        # One tile per frame, as InternVL does for video.
        return PreparedImage(tiles_to_tensor(frames, tile_size=self.vision.image_size))

    def prepare_frame(self, data: bytes) -> PreparedImage:
        """A live camera frame: one tile, as a frame of a video is."""
        image = load_image(data, self.limits)
        return PreparedImage(tiles_to_tensor([image], tile_size=self.vision.image_size))

    def prepare_audio(self, data: bytes) -> PreparedAudio:
        samples = load_audio(data, self.limits)
        windows = split_audio_windows(samples)
        return PreparedAudio(
            windows=[self.audio.window_features(w) for w in windows],
            num_tokens=sum(audio_token_count(len(w)) for w in windows),
        )

    # -- prompt -----------------------------------------------------------------------------

    def prompt_segments(
        self, messages: Sequence[Message], media_tokens: dict[str, int]
    ) -> list[Segment]:
        """ChatML prompt for `messages`, ending with the assistant generation prompt.

        `media_tokens` maps a media part's `ident` to its number of LLM tokens.
        """
        segments: list[Segment] = [f"<|im_start|>system\n{self.system_prompt}{self.separator}"]
        for message in messages:
            segments.append(f"<|im_start|>{message.role}\n")
            if message.role == "user":
                segments += self._user_content(message, media_tokens)
            else:
                segments.append(PlainText(message.text))
            segments.append(self.separator)
        segments.append("<|im_start|>assistant\n")
        return _merge_text(segments)

    def _user_content(self, message: Message, media_tokens: dict[str, int]) -> list[Segment]:
        special = self.tokenizer.special
        images = sum(1 for p in message.parts if isinstance(p, MediaPart) and p.type == "image")
        out: list[Segment] = []
        image_number = frame_number = 0
        for part in message.parts:
            if isinstance(part, TextPart):
                out.append(PlainText(part.text))
                continue
            tokens = media_tokens[part.ident]
            if part.type == "audio":
                out += [
                    (special.audio_start, 1),
                    (special.audio_context, tokens),
                    (special.audio_end, 1),
                    "\n",
                ]
            elif part.type == "frame":
                frame_number += 1
                out.append(f"Frame{frame_number}: ")
                out += self._image_block(tokens)
            elif part.type == "image":
                image_number += 1
                if images > 1:
                    out.append(f"Image-{image_number}: ")
                out += self._image_block(tokens)
            else:
                per_frame = self.vision.num_image_token
                for frame in range(tokens // per_frame):
                    out.append(f"Frame{frame + 1}: ")
                    out += self._image_block(per_frame)
        return out

    def _image_block(self, tokens: int) -> list[Segment]:
        special = self.tokenizer.special
        return [(special.img_start, 1), (special.img_context, tokens), (special.img_end, 1), "\n"]

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        ids: list[int] = []
        for segment in segments:
            if isinstance(segment, PlainText):
                ids += self.tokenizer.encode_plain(segment)
            elif isinstance(segment, str):
                ids += self.tokenizer.encode(segment)
            else:
                token_id, count = segment
                ids += [token_id] * count
        return ids


def _merge_text(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        previous = merged[-1] if merged else None
        if (
            isinstance(segment, str)
            and isinstance(previous, str)
            and type(segment) is type(previous)
        ):
            merged[-1] = type(segment)(previous + segment)
        elif segment != "":
            merged.append(segment)
    return merged


def write_generation_config(out_dir: Path, eos_ids: Sequence[int]) -> None:
    config = {
        "max_new_tokens": 1024,
        "do_sample": True,
        "eos_token_id": list(eos_ids),
        "pad_token_id": 151643,
    }
    (out_dir / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")
