"""A whole utterance through VoiceLM -> flow -> HiFT on the tiny checkpoint."""

from __future__ import annotations

import numpy as np
import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.speech.flow_stream import FlowStream
from iomni.model.speech.stream import (
    SAMPLES_PER_TOKEN,
    SpeechSession,
    decode_together,
    render_first_together,
)


def session(tiny: LoadedCheckpoint, seed: int = 0) -> SpeechSession:
    m = tiny.model
    return SpeechSession(m.voicelm, m.flow, m.hifigan, m.default_speaker_embedding, seed=seed)


def text(n: int, width: int) -> tuple[list[int], torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 150000, (n,), generator=g).tolist(), torch.randn(n, width, generator=g)


def speak(tiny: LoadedCheckpoint, n_text: int, seed: int = 0) -> tuple[SpeechSession, list]:
    s = session(tiny, seed)
    ids, hidden = text(n_text, tiny.config.llm_hidden_size)
    chunks = []
    for start in range(0, n_text, 5):
        chunks.append(s.push_text(ids[start : start + 5], hidden[start : start + 5]))
    chunks.append(s.finish())
    return s, chunks


def test_audio_length_is_40_ms_per_speech_token(tiny: LoadedCheckpoint) -> None:
    s, chunks = speak(tiny, 17)
    total = sum(c.size for group in chunks for c in group)
    assert total == SAMPLES_PER_TOKEN * len(s.tokens)
    assert len(s.tokens) >= 3 * 25


def test_first_audio_needs_two_text_groups(tiny: LoadedCheckpoint) -> None:
    """25 speech tokens per group plus 3 look-ahead: the first chunk renders on group 2."""
    _, chunks = speak(tiny, 17)
    assert chunks[0] == []
    assert [c.size for c in chunks[1]] == [24000 - 3840]
    assert [c.size for c in chunks[2]] == [24000]


def test_first_chunk_text_is_in_from_the_second_group_until_the_chunk_renders(
    tiny: LoadedCheckpoint,
) -> None:
    """What the speech decoder asks before taking more of a reply's text into a batch."""
    s = session(tiny)
    ids, hidden = text(12, tiny.config.llm_hidden_size)
    seen = []
    with torch.inference_mode():
        for start in (0, 5, 10):
            s.add_text(ids[start : start + 5], hidden[start : start + 5])
            seen.append(s.first_chunk_text_in())
            decode_together([s])
            list(s.iter_ready(s.text_tokens))
    assert seen == [False, True, False]  # the third: the first chunk was rendered


def test_the_tail_comes_in_one_second_chunks(tiny: LoadedCheckpoint) -> None:
    """The speech after the text ends is cut as if its tokens had streamed in (one render of
    it all was the longest wait between a reply's chunks); the mel stays exact
    (`test_streamed_audio_matches_one_shot`)."""
    s, chunks = speak(tiny, 17)
    tail = chunks[-1]
    assert len(tail) >= 2
    assert [c.size for c in tail[:-1]] == [24000] * (len(tail) - 1)
    assert 0 < tail[-1].size <= 24000 + 3 * SAMPLES_PER_TOKEN
    assert s.offset == len(s.tokens) and s.finish() == []


def test_same_seed_same_audio(tiny: LoadedCheckpoint) -> None:
    a = np.concatenate([c for g in speak(tiny, 12, seed=5)[1] for c in g])
    b = np.concatenate([c for g in speak(tiny, 12, seed=5)[1] for c in g])
    c = np.concatenate([c for g in speak(tiny, 12, seed=6)[1] for c in g])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@torch.inference_mode()
def test_streamed_audio_matches_one_shot(tiny: LoadedCheckpoint, monkeypatch) -> None:
    """The mel is exact: streaming re-renders the flow with the same chunk masks and noise
    (atol 1e-4). The waveform differs within a bound: each vocoder chunk restarts its sine
    phase and noise after the cached source and is cross-faded (Hamming pair sums to 1.08),
    as CosyVoice2 does; 25% relative RMS over the utterance (measured ~14% on random weights)."""
    mels: list[torch.Tensor] = []
    s = session(tiny)
    push = s.vocoder.push
    monkeypatch.setattr(
        s.vocoder, "push", lambda mel, final: (mels.append(mel), push(mel, final))[1]
    )
    ids, hidden = text(12, tiny.config.llm_hidden_size)
    pieces = [
        *s.push_text(ids[:5], hidden[:5]),
        *s.push_text(ids[5:10], hidden[5:10]),
        *s.push_text(ids[10:], hidden[10:]),
        *s.finish(),
    ]
    streamed = np.concatenate(pieces)
    m = tiny.model
    mel = m.flow.inference(
        torch.tensor([s.tokens]),
        m.default_speaker_embedding.reshape(1, -1),
        finalize=True,
        streaming=True,
    )
    torch.testing.assert_close(torch.cat(mels, dim=2), mel, atol=1e-4, rtol=0)
    one_shot, _ = m.hifigan.inference(mel, generator=torch.Generator().manual_seed(1))
    one_shot = one_shot.reshape(-1).numpy()
    assert streamed.shape == one_shot.shape
    assert float(np.sqrt(np.mean(one_shot**2))) > 1e-4
    error = np.sqrt(np.mean((streamed - one_shot) ** 2)) / np.sqrt(np.mean(one_shot**2))
    assert error < 0.25


def test_seams_have_no_clicks(tiny: LoadedCheckpoint, monkeypatch) -> None:
    """A chunk boundary continues the waveform that was playing: the samples right after a seam
    follow the tail the previous chunk rendered and held back (the cross-fade starts on it),
    not a fresh rendering that would jump. Random weights give noise-like audio, so a step-size
    check cannot see a click; this comparison can (without the fade the error is ~100%)."""
    from iomni.model.speech.hift import HiFTStreamer

    tails: list[np.ndarray] = []
    push = HiFTStreamer.push

    def recording(self, mel_chunk, final):  # type: ignore[no-untyped-def]
        out = push(self, mel_chunk, final)
        if self._speech is not None:
            tails.append(self._speech.reshape(-1).numpy().copy())
        return out

    monkeypatch.setattr(HiFTStreamer, "push", recording)
    _, chunks = speak(tiny, 27)
    pieces = [c for g in chunks for c in g]
    audio = np.concatenate(pieces)
    assert len(pieces) >= 4 and len(tails) == len(pieces) - 1
    seam = 0
    for piece, tail in zip(pieces[:-1], tails, strict=True):
        seam += piece.size
        after, expected = audio[seam : seam + 32], tail[:32]
        error = np.sqrt(np.mean((after - expected) ** 2)) / np.sqrt(np.mean(expected**2))
        assert error < 0.3, f"seam at sample {seam}: {error:.0%} off the waveform it continues"


def test_replies_rendering_first_chunks_together_sound_as_if_alone(
    tiny: LoadedCheckpoint, monkeypatch
) -> None:
    """What the Triton speech decoder does with a batch: decode the replies' text together,
    render their first chunks' flow in one pass, then each reply renders and vocodes alone."""
    seeds, lengths = (3, 4, 5), (17, 12, 17)
    alone = [
        np.concatenate([c for g in speak(tiny, n, seed)[1] for c in g])
        for seed, n in zip(seeds, lengths, strict=True)
    ]
    batched_passes: list[int] = []
    render_together = FlowStream.render_first_together.__func__  # type: ignore[attr-defined]

    def counted(cls, streams, ids):  # type: ignore[no-untyped-def]
        batched_passes.append(len(streams))
        return render_together(cls, streams, ids)

    monkeypatch.setattr(FlowStream, "render_first_together", classmethod(counted))
    sessions = [session(tiny, s) for s in seeds]
    texts = [text(n, tiny.config.llm_hidden_size) for n in lengths]
    audio: list[list[np.ndarray]] = [[] for _ in sessions]
    for start in range(0, max(lengths), 5):
        marks = [
            (s, s.add_text(ids[start : start + 5], hidden[start : start + 5]))
            for s, (ids, hidden) in zip(sessions, texts, strict=True)
            if start < len(ids)
        ]
        decode_together([s for s, _ in marks])
        render_first_together(marks)
        with torch.inference_mode():
            for s, mark in marks:
                audio[sessions.index(s)] += list(s.iter_ready(mark))
    for index, s in enumerate(sessions):
        audio[index] += s.finish()
    assert batched_passes == [3]  # all three first chunks, in one pass
    # The batched flow's float rounding (mel ~1e-6) reaches the waveform through the vocoder's
    # sine phase, a running sum of F0: measured 1.5e-4 at most on `tiny`, on samples of ~0.1.
    for mine, theirs in zip(audio, alone, strict=True):
        np.testing.assert_allclose(np.concatenate(mine), theirs, atol=1e-3)
