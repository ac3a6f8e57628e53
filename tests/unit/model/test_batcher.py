"""Continuous batching and session KV reuse, on the tiny model, without a server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch
from transformers import Qwen3Config

from iomni.errors import Internal, InvalidInput, Unavailable
from iomni.model import batcher as batcher_module
from iomni.model.batcher import ContinuousBatcher, SequenceRequest, StepEvent, _Prefill
from iomni.model.checkpoint import LoadedCheckpoint
from iomni.model.kv_cache import held_tokens
from iomni.model.llm import build_language_model, embed_token, forward, forward_groups
from iomni.model.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=8)
IMG = 151671


# Decoding sequences each on their own KV (CPU's default) or left-padded into one batch (an
# accelerator's): every test runs both ways.
@pytest.fixture(params=[False, True], ids=["own-kv", "packed"])
def pack_rows(request: pytest.FixtureRequest) -> bool:
    return request.param


@pytest.fixture
def batcher(tiny: LoadedCheckpoint, pack_rows: bool) -> Iterator[ContinuousBatcher]:
    b = ContinuousBatcher(
        tiny.model.language_model, max_batch=8, idle_wait_s=0.01, pack_rows=pack_rows
    )
    b.start()
    yield b
    b.stop()


class Collector:
    def __init__(self) -> None:
        self.events: list[StepEvent] = []
        self.done = threading.Event()

    def __call__(self, event: StepEvent) -> None:
        self.events.append(event)
        if event.finish_reason or event.error:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [e.token_id for e in self.events if e.token_id >= 0]


def submit(
    batcher: ContinuousBatcher,
    ids: list[int],
    params: SamplingParams = GREEDY,
    session: str = "",
    media: dict | None = None,
    cancelled=lambda: False,
) -> Collector:
    out = Collector()
    batcher.submit(
        SequenceRequest(
            ids,
            media or {},
            params,
            stop_ids=(),
            emit=out,
            is_cancelled=cancelled,
            session_id=session,
        )
    )
    return out


@torch.inference_mode()
def reference_steps(
    tiny: LoadedCheckpoint, ids: list[int], n: int = 8, media: dict | None = None
) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and the hidden state each was chosen from, one sequence alone."""
    lm = tiny.model.language_model
    step, cache = forward(lm, tiny.model.inputs_embeds(torch.tensor(ids), media or {}), None)
    tokens, hidden = [], []
    for _ in range(n):
        token = int(torch.argmax(step.logits))
        tokens.append(token)
        hidden.append(step.hidden.float())
        step, cache = forward(lm, embed_token(lm, token), cache)
    return tokens, hidden


def reference(
    tiny: LoadedCheckpoint, ids: list[int], n: int = 8, media: dict | None = None
) -> list[int]:
    return reference_steps(tiny, ids, n, media)[0]


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 150000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_one_sequence_matches_plain_decoding(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    ids = prompt(20, 0)
    out = submit(batcher, ids)
    assert out.done.wait(30)
    assert out.tokens == reference(tiny, ids)
    assert out.events[-1].finish_reason == "length"
    assert out.events[0].hidden is not None and out.events[0].prefill_ms > 0


def test_concurrent_sequences_share_steps_and_match_alone(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    prompts = [prompt(n, seed) for seed, n in enumerate([5, 17, 40, 9])]
    outs = [
        submit(batcher, ids, SamplingParams(temperature=0.0, max_new_tokens=12)) for ids in prompts
    ]
    for out in outs:
        assert out.done.wait(60)
    for ids, out in zip(prompts, outs, strict=True):
        assert out.tokens == reference(tiny, ids, 12)
    assert max(batcher.metrics.step_sequences) >= 2
    assert max(e.batch_size for out in outs for e in out.events) >= 2
    # Counted once per step, batched: every token that went out, no more.
    assert batcher.metrics.generated_tokens == sum(len(out.tokens) for out in outs)


def test_a_sampled_reply_in_a_batch_draws_as_if_alone(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    """Greedy rows take the batch's argmax; a seeded sampled row still draws from its own
    generator, the same tokens as alone."""
    sampled = SamplingParams(temperature=1.0, top_k=0, seed=7, max_new_tokens=12)
    alone = submit(batcher, prompt(9, 4), sampled)
    assert alone.done.wait(60)
    greedy = [prompt(n, seed) for seed, n in ((5, 14), (6, 30))]
    outs = [
        submit(batcher, ids, SamplingParams(temperature=0.0, max_new_tokens=12)) for ids in greedy
    ]
    beside = submit(batcher, prompt(9, 4), sampled)
    for out in [*outs, beside]:
        assert out.done.wait(60)
    assert beside.tokens == alone.tokens
    assert beside.tokens != reference(tiny, prompt(9, 4), 12)  # it did sample
    for ids, out in zip(greedy, outs, strict=True):
        assert out.tokens == reference(tiny, ids, 12)
    assert max(e.batch_size for e in beside.events) >= 2


def test_sequences_leaving_and_joining_the_batch_keep_their_hidden_states(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    """Different prompt lengths (padding), replies of different lengths (the batch shrinks
    while others go on) and late joiners: every hidden state equals decoding alone."""
    plan = [(3, 0, 20), (31, 1, 6), (12, 2, 14), (50, 3, 3)]
    outs = []
    for n, seed, reply in plan:
        outs.append(
            submit(batcher, prompt(n, seed), SamplingParams(temperature=0.0, max_new_tokens=reply))
        )
    for out in outs:
        assert out.done.wait(60)
    late = submit(batcher, prompt(7, 9), SamplingParams(temperature=0.0, max_new_tokens=5))
    assert late.done.wait(60)
    for (n, seed, reply), out in zip([*plan, (7, 9, 5)], [*outs, late], strict=True):
        tokens, hidden = reference_steps(tiny, prompt(n, seed), reply)
        assert out.tokens == tokens
        got = torch.stack([e.hidden for e in out.events if e.token_id >= 0])
        torch.testing.assert_close(got, torch.stack(hidden), atol=1e-4, rtol=1e-4)
    assert max(batcher.metrics.step_sequences) >= 3


def test_cancel_stops_within_one_step(batcher: ContinuousBatcher) -> None:
    flag = threading.Event()
    out = Collector()

    def emit(event: StepEvent) -> None:
        out(event)
        if len(out.tokens) == 3:
            flag.set()

    batcher.submit(
        SequenceRequest(
            prompt(10, 1),
            {},
            SamplingParams(temperature=0.0, max_new_tokens=500),
            (),
            emit,
            is_cancelled=flag.is_set,
        )
    )
    assert out.done.wait(30)
    assert out.events[-1].finish_reason == "cancelled"
    assert len(out.tokens) <= 4
    assert batcher.metrics.cancelled == 1


@pytest.mark.parametrize("fails_at", [1, 4], ids=["first-token", "decoding"])
def test_one_sequence_failing_ends_only_that_sequence(
    tiny: LoadedCheckpoint,
    batcher: ContinuousBatcher,
    monkeypatch: pytest.MonkeyPatch,
    fails_at: int,
) -> None:
    """A sampled sequence whose sampler raises (as NaN logits make it) gets its own error;
    a greedy stream decoding beside it finishes with the tokens it has alone."""
    doomed = SamplingParams(temperature=0.7, max_new_tokens=50)
    calls = 0
    sample = batcher_module.sample_next

    def failing(logits, params, generator):  # type: ignore[no-untyped-def]
        nonlocal calls
        if params is doomed:
            calls += 1
            if calls == fails_at:
                raise RuntimeError("probability tensor contains either `inf`, `nan`")
        return sample(logits, params, generator)

    monkeypatch.setattr(batcher_module, "sample_next", failing)
    steady = submit(batcher, prompt(12, 1), SamplingParams(temperature=0.0, max_new_tokens=40))
    bad = submit(batcher, prompt(9, 2), doomed)
    assert bad.done.wait(30) and steady.done.wait(60)
    assert isinstance(bad.events[-1].error, Internal)
    assert len(bad.tokens) == fails_at - 1
    assert steady.events[-1].finish_reason == "length"
    assert steady.tokens == reference(tiny, prompt(12, 1), 40)


def test_media_with_nan_rows_is_refused_and_the_others_go_on(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    steady = submit(batcher, prompt(12, 1), SamplingParams(temperature=0.0, max_new_tokens=30))
    rows = torch.randn(2, tiny.config.llm_hidden_size)
    rows[1, 3] = float("nan")
    sampled = SamplingParams(temperature=0.7, max_new_tokens=5)
    bad = submit(batcher, [5, IMG, IMG, 6], sampled, media={IMG: rows})
    assert bad.done.wait(30) and steady.done.wait(60)
    assert isinstance(bad.events[-1].error, InvalidInput)
    assert "NaN or infinite" in str(bad.events[-1].error) and not bad.tokens
    assert steady.tokens == reference(tiny, prompt(12, 1), 30)


def test_stopping_ends_every_sequence_with_unavailable(tiny: LoadedCheckpoint) -> None:
    """Unloading the model mid-reply: the running stream and anything sent later end with an
    error instead of waiting forever."""
    b = ContinuousBatcher(tiny.model.language_model, max_batch=8, idle_wait_s=0.01)
    b.start()
    started = threading.Event()
    running = Collector()

    def emit(event: StepEvent) -> None:
        running(event)
        started.set()

    endless = SamplingParams(temperature=0.0, max_new_tokens=100_000)
    b.submit(SequenceRequest(prompt(10, 1), {}, endless, (), emit))
    assert started.wait(30)
    b.stop()
    assert running.done.wait(5)
    assert isinstance(running.events[-1].error, Unavailable)
    late = submit(b, prompt(5, 2))
    assert late.done.wait(5) and isinstance(late.events[-1].error, Unavailable)


def test_next_turn_reuses_the_session_prefix(
    tiny: LoadedCheckpoint, batcher: ContinuousBatcher
) -> None:
    first_ids = prompt(30, 2)
    first = submit(batcher, first_ids, session="s1")
    assert first.done.wait(30)
    second_ids = first_ids + first.tokens[:5] + prompt(6, 3)
    second = submit(batcher, second_ids, session="s1")
    assert second.done.wait(30)
    assert second.events[0].reused_tokens == 35
    assert second.tokens == reference(tiny, second_ids)
    assert batcher.metrics.kv_hits == 1 and batcher.metrics.kv_misses == 1
    other = submit(batcher, second_ids, session="s2")
    assert other.done.wait(30) and other.events[0].reused_tokens == 0


def test_the_kv_budget_counts_the_memory_a_cache_holds(tiny: LoadedCheckpoint) -> None:
    """A decoded cache keeps room to grow (its storage doubles when full): the budget counts
    that room, so two 300-token sessions (about 600 slots each) do not both fit in 700."""
    b = ContinuousBatcher(tiny.model.language_model, kv_cache_tokens=700, idle_wait_s=0.01)
    b.start()
    try:
        for session in ("a", "b"):
            out = submit(
                b, prompt(300, 1), SamplingParams(temperature=0.0, max_new_tokens=3), session
            )
            assert out.done.wait(60)
        deadline = time.monotonic() + 10  # the entry is stored after the last event
        while "b" not in b.kv and time.monotonic() < deadline:
            time.sleep(0.01)
        entry = b.kv.take("b")
        assert entry is not None and b.kv.take("a") is None
        assert held_tokens(entry.cache) > 400 and b.kv.held == 0
    finally:
        b.stop()


def test_changed_media_is_not_reused(tiny: LoadedCheckpoint, batcher: ContinuousBatcher) -> None:
    hidden = tiny.config.llm_hidden_size
    ids = [5, 6, IMG, IMG, IMG, 7, 8, 9]
    first = submit(batcher, ids, session="m", media={IMG: torch.randn(3, hidden)})
    assert first.done.wait(30)
    changed = {IMG: torch.randn(3, hidden)}
    second = submit(batcher, ids + [10], session="m", media=changed)
    assert second.done.wait(30)
    assert second.events[0].reused_tokens == 2  # up to the first placeholder
    assert second.tokens == reference(tiny, ids + [10], media=changed)


@pytest.fixture
def chunked(tiny: LoadedCheckpoint, pack_rows: bool) -> Iterator[ContinuousBatcher]:
    """Prefill in chunks of 7 tokens whenever something is decoding."""
    b = ContinuousBatcher(
        tiny.model.language_model,
        max_batch=8,
        idle_wait_s=0.01,
        prefill_chunk=7,
        pack_rows=pack_rows,
    )
    b.start()
    yield b
    b.stop()


def test_chunked_prefill_gives_the_same_tokens(
    chunked: ContinuousBatcher, tiny: LoadedCheckpoint
) -> None:
    """A long prompt prefilled 7 tokens at a time while others decode: the same greedy tokens,
    and the hidden states they were chosen from, as one forward over the whole prompt, for it
    and for the streams it joined."""
    long_params = SamplingParams(temperature=0.0, max_new_tokens=40)
    running = [submit(chunked, prompt(12, seed), long_params) for seed in range(2)]
    while not all(r.tokens for r in running):
        threading.Event().wait(0.005)
    joining = submit(chunked, prompt(150, 9))
    for out in [*running, joining]:
        assert out.done.wait(120)
    for ids, out, n in [(prompt(150, 9), joining, 8)] + [
        (prompt(12, seed), out, 40) for seed, out in enumerate(running)
    ]:
        tokens, hidden = reference_steps(tiny, ids, n)
        assert out.tokens == tokens
        got = torch.stack([e.hidden for e in out.events if e.token_id >= 0])
        torch.testing.assert_close(got, torch.stack(hidden), atol=1e-4, rtol=1e-4)


def test_running_streams_keep_decoding_while_a_prompt_is_prefilled(
    chunked: ContinuousBatcher,
) -> None:
    """The running stream gets tokens between the joining prompt's admission and its first
    token: prefill never stalls decoding for the whole prompt."""
    running = submit(chunked, prompt(10, 1), SamplingParams(temperature=0.0, max_new_tokens=200))
    while len(running.tokens) < 3:
        threading.Event().wait(0.005)
    before = len(running.tokens)
    joining = submit(chunked, prompt(140, 2))  # 20 chunks of 7
    while not joining.tokens:
        threading.Event().wait(0.001)
    during = len(running.tokens) - before
    assert during >= 10  # one decode step per prefill chunk, give or take admission timing
    assert joining.done.wait(60) and running.done.wait(120)


def test_a_prompt_chunk_rides_in_the_decode_step(
    chunked: ContinuousBatcher, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stream decodes, each chunk of a joining prompt goes through the same forward as
    the stream's next token, not a forward of its own."""
    passes: list[list[tuple[int, int]]] = []  # each forward: (rows, tokens) of every group

    def recording(body, groups):  # type: ignore[no-untyped-def]
        passes.append([tuple(g.embeds.shape[:2]) for g in groups])
        return forward_groups(body, groups)

    monkeypatch.setattr(batcher_module, "forward_groups", recording)
    running = submit(chunked, prompt(10, 1), SamplingParams(temperature=0.0, max_new_tokens=200))
    while len(running.tokens) < 3:
        threading.Event().wait(0.005)
    joining = submit(chunked, prompt(140, 2))  # 20 chunks of 7
    assert joining.done.wait(60) and running.done.wait(120)
    chunks = [p for p in passes if any(tokens == 7 for _, tokens in p)]
    assert len(chunks) >= 19
    # Every chunk shared its forward with the running stream's token (one row of one token).
    assert all((1, 1) in p for p in chunks), chunks


def test_a_short_new_prompt_is_prefilled_whole_a_long_one_in_bites(tiny: LoadedCheckpoint) -> None:
    """Measured: a decode step 30 ms, a prompt token 0.3 ms. Half a step is 50 tokens; a new
    prompt that costs at most two steps (200 tokens) or 50 ms goes in whole, with the short
    ones behind it up to 8 steps' or 200 ms' worth; a long one, or what is left of one already
    started, takes the half-step bite. A short one goes first wherever it waits, and the long
    ones still get their bite beside it."""
    b = ContinuousBatcher(tiny.model.language_model)  # not started: the policy alone
    b._active = [object()]  # type: ignore[list-item]  # something is decoding
    b._step_ms, b._prefill_token_ms = 30.0, 0.3
    hidden = tiny.config.llm_hidden_size

    def waiting(tokens: int, fed: int = 0) -> list[_Prefill]:
        request = SequenceRequest([], {}, SamplingParams(), stop_ids=(), emit=lambda e: None)
        embeds = torch.zeros(1, tokens, hidden)
        return [_Prefill(request, [], None, embeds, 0, 0.0, fed)]  # type: ignore[arg-type]

    def bites(*jobs: list[_Prefill]) -> list[tuple[int, int]]:
        """(prompt length, tokens this turn) of each bite, in the order they go in."""
        b._prefilling = [job for group in jobs for job in group]
        return [(job.embeds.shape[1], take) for job, take in b._bites()]

    assert bites(waiting(110)) == [(110, 110)]
    assert bites(waiting(200)) == [(200, 200)]
    assert bites(waiting(3000)) == [(3000, 50)]
    assert bites(waiting(3000, fed=2900)) == [(3000, 50)]  # the rest of a long one: bites
    # Short ones waiting together go in together, up to 8 steps (800 tokens): 7 of 8 here.
    assert bites(*[waiting(110) for _ in range(8)]) == [(110, 110)] * 7
    # Both short ones whole, wherever they wait, and the long one's bite beside them.
    assert bites(waiting(110), waiting(3000), waiting(110)) == [(110, 110)] * 2 + [(3000, 50)]
    assert bites(waiting(3000), waiting(110)) == [(110, 110), (3000, 50)]
    # One fast stream (9 ms steps, 0.2 ms a token): a 110-token prompt (22 ms) is still short
    # (at most 50 ms), and 8 together (176 ms) go in one turn (at most 200 ms).
    b._step_ms, b._prefill_token_ms = 9.0, 0.2
    assert bites(*[waiting(110) for _ in range(8)]) == [(110, 110)] * 8
    assert bites(waiting(300)) == [(300, 22)]  # 60 ms: a bite of half a step
    # A new 20-token turn does not wait for the 3000-token prompt started before it.
    assert bites(waiting(3000, fed=64), waiting(20)) == [(20, 20), (3000, 22)]
    b._active = []
    assert bites(waiting(3000), waiting(110)) == [(3000, 3000), (110, 110)]  # nobody decoding


def test_a_model_with_sliding_window_layers_is_refused(tiny: LoadedCheckpoint) -> None:
    """The batcher's mixed forward has no sliding-window attention: such a model fails at
    load with a message, not with wrong tokens."""
    settings = tiny.config.llm_config.to_dict()
    settings.pop("layer_types")  # derived from the window settings below
    settings.update(use_sliding_window=True, sliding_window=8, max_window_layers=1)
    config = Qwen3Config(**settings)
    with pytest.raises(Internal, match="sliding-window"):
        ContinuousBatcher(build_language_model(config))
