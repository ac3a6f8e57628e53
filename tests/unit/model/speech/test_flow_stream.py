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


def test_first_chunks_rendered_together_equal_each_alone_and_go_on_alike(
    tiny: LoadedCheckpoint,
) -> None:
    """Replies with different voices: one batched pass gives each the first-chunk mel it gets
    alone, and leaves each the states its next chunk needs."""
    flow = tiny.model.flow
    g = torch.Generator().manual_seed(1)
    speakers = [
        tiny.model.default_speaker_embedding.reshape(1, -1),
        torch.randn(1, 192, generator=g),
    ]
    ids = [tokens(tiny, n) for n in (60, 61, 62)]
    alone = [FlowStream(flow, speakers[i % 2]) for i in range(3)]
    together = [FlowStream(flow, speakers[i % 2]) for i in range(3)]
    firsts = FlowStream.render_first_together(together, [i[:28] for i in ids])
    for index, stream in enumerate(alone):
        start, mel = stream.render(ids[index][:28], finalize=False)
        assert start == 0
        torch.testing.assert_close(firsts[index], mel, atol=1e-5, rtol=0)
        for upto, final in ((53, False), (60, True)):
            expected = stream.render(ids[index][:upto], finalize=final)
            got = together[index].render(ids[index][:upto], finalize=final)
            assert got[0] == expected[0]
            torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


def test_only_fresh_streams_of_equal_length_render_together(tiny: LoadedCheckpoint) -> None:
    flow = tiny.model.flow
    speaker = tiny.model.default_speaker_embedding.reshape(1, -1)
    ids = tokens(tiny, 60)
    used = FlowStream(flow, speaker)
    used.render(ids[:28], finalize=False)
    with pytest.raises(ValueError, match="only first chunks"):
        FlowStream.render_first_together([used, FlowStream(flow, speaker)], [ids[:53], ids[:53]])
    with pytest.raises(ValueError, match="all of one length"):
        pair = [FlowStream(flow, speaker), FlowStream(flow, speaker)]
        FlowStream.render_first_together(pair, [ids[:28], ids[:29]])
    fewer_steps = FlowStream(flow, speaker, steps=4)
    with pytest.raises(ValueError, match="ODE grid"):
        FlowStream.render_first_together([FlowStream(flow, speaker), fewer_steps], [ids[:28]] * 2)
