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
HIDDEN = "HIDDEN"
REUSED_TOKENS = "REUSED_TOKENS"
PREFILL_MS = "PREFILL_MS"
FINISH_REASON = "FINISH_REASON"
ERROR_CODE = "ERROR_CODE"  # a stream's structured error: iomni.errors.ErrorCode name
ERROR_MESSAGE = "ERROR_MESSAGE"
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


# Streaming models answer an error with these outputs in a final response (Triton passes a
# stream's error as bare text, without a status).
STREAM_ERROR = (
    TensorSpec(ERROR_CODE, "TYPE_STRING", (1,)),
    TensorSpec(ERROR_MESSAGE, "TYPE_STRING", (1,)),
)

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
            TensorSpec(HIDDEN, "TYPE_FP32", (-1,)),
            TensorSpec(REUSED_TOKENS, "TYPE_INT32", (1,)),
            TensorSpec(PREFILL_MS, "TYPE_FP32", (1,)),
            TensorSpec(FINISH_REASON, "TYPE_STRING", (1,)),
            *STREAM_ERROR,
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
        outputs=(TensorSpec(AUDIO, "TYPE_FP32", (-1,)), *STREAM_ERROR),
        max_batch_size=8,
        decoupled=True,
        controls=(START, END),
    ),
}
