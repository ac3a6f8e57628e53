"""Tensor names of the Triton models, defined once (docs/triton.md documents them, and a test
checks every config.pbtxt against this table)."""

from __future__ import annotations

from dataclasses import dataclass

VISION_ENCODER = "vision_encoder"
AUDIO_ENCODER = "audio_encoder"
LLM = "llm"
SPEECH_DECODER = "speech_decoder"
MODELS = (VISION_ENCODER, AUDIO_ENCODER, LLM, SPEECH_DECODER)

PIXEL_VALUES = "PIXEL_VALUES"
IMAGE_EMBEDS = "IMAGE_EMBEDS"
MEL = "MEL"
AUDIO_EMBEDS = "AUDIO_EMBEDS"
INPUT_IDS = "INPUT_IDS"
TOKEN_ID = "TOKEN_ID"
TEXT = "TEXT"
HIDDEN = "HIDDEN"
BATCH_SIZE = "BATCH_SIZE"
REUSED_TOKENS = "REUSED_TOKENS"
FINISH_REASON = "FINISH_REASON"
TEXT_TOKEN_IDS = "TEXT_TOKEN_IDS"
SPEAKER_WAV = "SPEAKER_WAV"
AUDIO = "AUDIO"
START = "START"
END = "END"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # Triton config type, e.g. TYPE_FP32
    dims: tuple[int, ...]  # without the batch dimension when the model batches
    optional: bool = False


@dataclass(frozen=True)
class ModelContract:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    decoupled: bool = False
    controls: tuple[str, ...] = ()  # sequence-batcher control inputs (INT32 [1])


CONTRACTS: dict[str, ModelContract] = {
    VISION_ENCODER: ModelContract(
        inputs=(TensorSpec(PIXEL_VALUES, "TYPE_FP32", (3, 448, 448)),),
        outputs=(TensorSpec(IMAGE_EMBEDS, "TYPE_FP32", (-1, -1)),),
        max_batch_size=16,
    ),
    AUDIO_ENCODER: ModelContract(
        inputs=(TensorSpec(MEL, "TYPE_FP32", (128, -1)),),
        outputs=(TensorSpec(AUDIO_EMBEDS, "TYPE_FP32", (-1, -1)),),
        max_batch_size=8,
    ),
    LLM: ModelContract(
        inputs=(
            TensorSpec(INPUT_IDS, "TYPE_INT64", (-1,)),
            TensorSpec(IMAGE_EMBEDS, "TYPE_FP32", (-1, -1), optional=True),
            TensorSpec(AUDIO_EMBEDS, "TYPE_FP32", (-1, -1), optional=True),
        ),
        outputs=(
            TensorSpec(TOKEN_ID, "TYPE_INT64", (1,)),
            TensorSpec(TEXT, "TYPE_STRING", (1,)),
            TensorSpec(HIDDEN, "TYPE_FP32", (-1,)),
            TensorSpec(BATCH_SIZE, "TYPE_INT32", (1,)),
            TensorSpec(REUSED_TOKENS, "TYPE_INT32", (1,)),
            TensorSpec(FINISH_REASON, "TYPE_STRING", (1,)),
        ),
        max_batch_size=0,
        decoupled=True,
    ),
    SPEECH_DECODER: ModelContract(
        inputs=(
            TensorSpec(TEXT_TOKEN_IDS, "TYPE_INT64", (-1,)),
            TensorSpec(HIDDEN, "TYPE_FP32", (-1, -1)),
            TensorSpec(SPEAKER_WAV, "TYPE_STRING", (1,), optional=True),
        ),
        outputs=(TensorSpec(AUDIO, "TYPE_FP32", (-1,)),),
        max_batch_size=8,
        decoupled=True,
        controls=(START, END),
    ),
}
