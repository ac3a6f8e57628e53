"""The two settings that trade audio for first-audio latency: a shorter first chunk and fewer
flow steps. Off by default; on, they change the audio but not its length."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iomni.errors import InvalidInput
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.speech.flow_stream import FlowStream
from iomni.model.speech.stream import SAMPLES_PER_TOKEN, SpeechSession, SpeechSettings


def speak(
    tiny: LoadedCheckpoint, settings: SpeechSettings, n_text: int = 17
) -> tuple[SpeechSession, list[list[np.ndarray]]]:
    m = tiny.model
    session = SpeechSession(
        m.voicelm, m.flow, m.hifigan, m.default_speaker_embedding, seed=1, settings=settings
    )
    g = torch.Generator().manual_seed(n_text)
    ids = torch.randint(0, 150000, (n_text,), generator=g).tolist()
    hidden = torch.randn(n_text, tiny.config.llm_hidden_size, generator=g)
    groups = [session.push_text(ids[i : i + 5], hidden[i : i + 5]) for i in range(0, n_text, 5)]
    return session, [*groups, session.finish()]


def joined(groups: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([c for group in groups for c in group])


def test_defaults_leave_the_audio_unchanged(tiny: LoadedCheckpoint) -> None:
    default = joined(speak(tiny, SpeechSettings())[1])
    explicit = SpeechSettings(
        first_chunk_tokens=25, flow_steps=tiny.model.flow.decoder.params.n_timesteps
    )
    assert np.array_equal(default, joined(speak(tiny, explicit)[1]))


def test_a_short_first_chunk_gives_audio_after_the_first_text_group(
    tiny: LoadedCheckpoint,
) -> None:
    session, groups = speak(tiny, SpeechSettings(first_chunk_tokens=10))
    # 10 tokens, less the 4 held back for the cross-fade; then up to the flow's 25-token grid.
    assert [c.size for c in groups[0]] == [10 * SAMPLES_PER_TOKEN - 3840]
    assert [c.size for c in groups[1]] == [15 * SAMPLES_PER_TOKEN]
    assert [c.size for c in groups[2]] == [25 * SAMPLES_PER_TOKEN]
    assert sum(c.size for g in groups for c in g) == SAMPLES_PER_TOKEN * len(session.tokens)


@torch.inference_mode()
def test_a_short_first_chunk_changes_only_the_first_chunks_mel(tiny: LoadedCheckpoint) -> None:
    """The short chunk is rendered from a partial flow chunk (its attention sees fewer tokens);
    the next render recomputes that chunk whole, so from there on the mel is the default's.
    The waveform differs more widely: the vocoder's seams move (each restarts its sine phase)."""
    m = tiny.model
    speaker = m.default_speaker_embedding.reshape(1, -1)
    ids = torch.randint(0, 6561, (28,), generator=torch.Generator().manual_seed(0)).tolist()
    default = FlowStream(m.flow, speaker).render(ids, finalize=False)[1]
    short = FlowStream(m.flow, speaker)
    _, head = short.render(ids[:13], finalize=False)
    start, rest = short.render(ids, finalize=False)
    assert start == 0 and head.shape[-1] == 20 and rest.shape[-1] == 50
    assert not torch.allclose(head, default[..., :20], atol=1e-3)
    assert torch.allclose(rest[..., 20:], default[..., 20:], atol=1e-5)


def test_fewer_flow_steps_run_fewer_estimator_passes(tiny: LoadedCheckpoint) -> None:
    m = tiny.model
    calls = {"n": 0}
    estimate = FlowStream._estimate

    def counted(self, *args):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        return estimate(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FlowStream, "_estimate", counted)
        stream = FlowStream(m.flow, m.default_speaker_embedding.reshape(1, -1), steps=4)
        stream.render(list(range(28)), finalize=False)
    assert calls["n"] == 4
    default = joined(speak(tiny, SpeechSettings())[1])
    fewer = joined(speak(tiny, SpeechSettings(flow_steps=4))[1])
    assert default.size == fewer.size and not np.allclose(default, fewer, atol=1e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"first_chunk_tokens": 4}, "first_chunk_tokens must be 0 (off) or 5..25, not 4"),
        ({"first_chunk_tokens": 26}, "not 26"),
        ({"flow_steps": -1}, "flow_steps must be 0"),
        ({"flow_steps": 51}, "1..50, not 51"),
    ],
)
def test_out_of_range_settings_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInput, match=message.replace("(", r"\(").replace(")", r"\)")):
        SpeechSettings(**kwargs)
