"""One contract, two transports: every check here runs against the in-process parts and against
the same parts over a real Triton server. What `ModelParts` promises (iomni.parts), both deliver:
embeddings of the same shape and value, greedy tokens equal to the model's own, a hidden state
per token when asked (none otherwise), the prefill time on the first step, the session's KV cache
reused on its next turn, a stream that stops when closed, and speech audio for text."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from iomni.engine.parts import InProcessParts
from iomni.model.checkpoint import LoadedCheckpoint, fingerprint
from iomni.model.llm import embed_token, forward
from iomni.model.processor import Processor
from iomni.model.sampling import SamplingParams
from iomni.model.speech.stream import SAMPLES_PER_TOKEN, SpeechSession
from iomni.parts import GenerationRequest, LLMStep, ModelParts, SpeechOptions
from iomni.triton.client import TritonParts
from iomni.triton.server import TritonServer
from iomni.triton.tensors import AUDIO_EMBEDS, IMAGE_EMBEDS
from tests.conftest import png_bytes, wav_bytes

TRANSPORTS = ("inprocess", "triton")
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=6)


@pytest.fixture(params=TRANSPORTS)
async def parts(
    request: pytest.FixtureRequest,
    tiny: LoadedCheckpoint,
    tiny_dir: Path,
    processor: Processor,
    triton: TritonServer,
) -> AsyncIterator[ModelParts]:
    special = processor.tokenizer.special
    if request.param == "inprocess":
        transport: ModelParts = InProcessParts(tiny)
    else:
        transport = TritonParts(
            triton.grpc_url,
            fingerprint(tiny_dir),
            {special.img_context: IMAGE_EMBEDS, special.audio_context: AUDIO_EMBEDS},
        )
    yield transport
    await transport.close()  # type: ignore[attr-defined]


def prompt(processor: Processor, text: str) -> list[int]:
    return processor.tokenizer.encode(
        f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
    )


def generation(
    processor: Processor, ids: list[int], session: str = "", hidden: bool = True
) -> GenerationRequest:
    return GenerationRequest(
        input_ids=ids,
        media={},
        params=GREEDY,
        stop_ids=processor.tokenizer.special.stop_ids,
        session_id=session,
        return_hidden=hidden,
    )


async def steps_of(parts: ModelParts, request: GenerationRequest) -> list[LLMStep]:
    return [step async for step in parts.generate(request)]


@torch.inference_mode()
def reference_tokens(tiny: LoadedCheckpoint, ids: list[int], count: int) -> list[int]:
    """Greedy decoding straight on the modules, the ground truth both transports must match."""
    lm = tiny.model.language_model
    step, cache = forward(lm, tiny.model.inputs_embeds(torch.tensor(ids), {}), None)
    out = []
    for _ in range(count):
        token = int(step.logits.argmax())
        out.append(token)
        step, cache = forward(lm, embed_token(lm, token), cache)
    return out


async def test_greedy_tokens_are_the_models_own(
    parts: ModelParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    ids = prompt(processor, "Name three colours.")
    steps = await steps_of(parts, generation(processor, ids))
    tokens = [s.token_id for s in steps]
    assert tokens == reference_tokens(tiny, ids, len(tokens))
    assert (
        len(tokens) == GREEDY.max_new_tokens or tokens[-1] in processor.tokenizer.special.stop_ids
    )


async def test_every_step_has_its_hidden_state_and_the_first_the_prefill_time(
    parts: ModelParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    steps = await steps_of(parts, generation(processor, prompt(processor, "Hello")))
    width = tiny.config.llm_hidden_size
    assert all(s.hidden is not None and tuple(s.hidden.shape) == (width,) for s in steps)
    assert all(s.hidden.dtype == torch.float32 for s in steps)  # type: ignore[union-attr]
    assert steps[0].timings_ms["prefill"] > 0
    assert all(not s.timings_ms for s in steps[1:])


async def test_no_hidden_states_when_not_asked(parts: ModelParts, processor: Processor) -> None:
    steps = await steps_of(parts, generation(processor, prompt(processor, "Hi"), hidden=False))
    assert steps and all(s.hidden is None for s in steps)


async def test_a_sessions_next_turn_reuses_its_kv_cache(
    parts: ModelParts, processor: Processor, request: pytest.FixtureRequest
) -> None:
    session = f"contract-{request.node.callspec.id}"
    first_ids = prompt(processor, "Remember kumquat.")
    first = await steps_of(parts, generation(processor, first_ids, session))
    assert first[0].reused_tokens == 0
    said = [s.token_id for s in first]
    second_ids = [*first_ids, *said, *prompt(processor, "Which fruit?")]
    second = await steps_of(parts, generation(processor, second_ids, session))
    assert second[0].reused_tokens >= len(first_ids)
    other = await steps_of(parts, generation(processor, second_ids, session + "-other"))
    assert other[0].reused_tokens == 0  # the cache is the session's, not anyone's
    assert [s.token_id for s in other] == [s.token_id for s in second]  # reuse changes nothing


async def test_closing_the_stream_stops_generation(parts: ModelParts, processor: Processor) -> None:
    request = generation(processor, prompt(processor, "Talk for a long time."))
    request.params = SamplingParams(temperature=0.0, max_new_tokens=500)
    stream = parts.generate(request)
    got = [await anext(stream) for _ in range(3)]
    await stream.aclose()  # type: ignore[attr-defined]
    assert len(got) == 3
    # The transport is still usable: the closed sequence does not block the next one.
    assert len(await steps_of(parts, generation(processor, prompt(processor, "Next")))) >= 1


async def test_image_embeddings_match(
    parts: ModelParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    pixels = processor.prepare_image(png_bytes(448, 448)).pixel_values
    rows = await parts.encode_images(pixels)
    with torch.inference_mode():
        expected = tiny.model.encode_images(pixels)
    assert rows.shape == expected.shape
    torch.testing.assert_close(rows.float(), expected.float(), atol=1e-4, rtol=1e-4)


async def test_audio_embeddings_match(
    parts: ModelParts, tiny: LoadedCheckpoint, processor: Processor
) -> None:
    windows = processor.prepare_audio(wav_bytes(2.0)).windows
    rows = await parts.encode_audio(windows)
    with torch.inference_mode():
        expected = tiny.model.encode_audio(windows)
    assert [r.shape for r in rows] == [e.shape for e in expected]
    for got, want in zip(rows, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), atol=1e-4, rtol=1e-4)


async def test_speech_renders_text_into_audio(
    parts: ModelParts, tiny: LoadedCheckpoint, request: pytest.FixtureRequest
) -> None:
    speech = await parts.open_speech(
        SpeechOptions(seed=3, sequence_id=f"contract-speech-{request.node.callspec.id}")
    )
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (15,), generator=generator).tolist()
    hidden = torch.randn(15, tiny.config.llm_hidden_size, generator=generator)
    chunks = []
    for start in range(0, 15, 5):
        chunks += await speech.push_text(ids[start : start + 5], hidden[start : start + 5])
    chunks += await speech.finish()
    await speech.close()
    audio = np.concatenate(chunks)
    assert audio.dtype == np.float32 and audio.size > 0
    assert audio.size % SAMPLES_PER_TOKEN == 0 and np.isfinite(audio).all()
    m = tiny.model
    session = SpeechSession(m.voicelm, m.flow, m.hifigan, m.default_speaker_embedding, seed=3)
    with torch.inference_mode():
        expected = [
            c for s in range(0, 15, 5) for c in session.push_text(ids[s : s + 5], hidden[s : s + 5])
        ]
        expected += session.finish()
    np.testing.assert_allclose(audio, np.concatenate(expected), atol=1e-3)
