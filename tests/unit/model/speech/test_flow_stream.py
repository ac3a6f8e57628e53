"""Streaming the flow incrementally gives exactly what rendering each prefix gives, while the
work per chunk stays flat (only new frames are computed)."""

from __future__ import annotations

import pytest
import torch

from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.speech.flow_stream import FlowStream


def tokens(tiny: LoadedCheckpoint, n: int) -> list[int]:
    vocab = tiny.model.flow.config.vocab_size
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(n)).tolist()


@pytest.mark.parametrize("hop", [25, 10])  # chunk-aligned, and partial chunks recomputed
def test_incremental_render_equals_rendering_each_prefix(tiny: LoadedCheckpoint, hop: int) -> None:
    flow = tiny.model.flow
    speaker = tiny.model.default_speaker_embedding.reshape(1, -1)
    ids = tokens(tiny, 131)
    stream = FlowStream(flow, speaker)
    lookahead = flow.config.pre_lookahead_len
    for upto in [*range(hop + lookahead, len(ids), hop), len(ids)]:
        final = upto == len(ids)
        start, mel = stream.render(ids[:upto], finalize=final)
        whole = flow.inference(torch.tensor([ids[:upto]]), speaker, finalize=final, streaming=True)
        assert mel.shape[2] == whole.shape[2] - 2 * start
        torch.testing.assert_close(mel, whole[:, :, 2 * start :], atol=1e-5, rtol=0)


def test_work_per_chunk_is_flat(tiny: LoadedCheckpoint, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each call computes the new chunk's 50 mel frames, however long the utterance is."""
    flow = tiny.model.flow
    stream = FlowStream(flow, tiny.model.default_speaker_embedding.reshape(1, -1))
    computed: list[int] = []
    estimate = stream._estimate

    def counting(x, *args):  # type: ignore[no-untyped-def]
        computed.append(x.shape[2])
        return estimate(x, *args)

    monkeypatch.setattr(stream, "_estimate", counting)
    ids = tokens(tiny, 300)
    for upto in range(28, 300, 25):
        stream.render(ids[:upto], finalize=False)
    steps = flow.decoder.params.n_timesteps
    assert len(computed) == steps * len(range(28, 300, 25))
    assert set(computed) == {50}
