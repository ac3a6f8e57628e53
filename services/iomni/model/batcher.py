"""Continuous batching for the LLM, with per-session KV-cache reuse (used by both transports:
the `llm` Triton model and the in-process parts).

A background loop owns the model. Between decode steps it admits new sequences (prefilling
each on top of its session's cached prefix when the prompt extends it), then runs ONE forward
for every active sequence: their caches are left-padded to a common length and masked, and
each sequence gets its own position id. Cancelled sequences leave before the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, Qwen3ForCausalLM

from iomni.errors import Internal, InvalidInput, IomniError, Unavailable
from iomni.model.kv_cache import BatchCache, as_growing, held_tokens
from iomni.model.llm import TokenGroup, forward_groups, prefix_causal_mask
from iomni.model.sampling import SamplingParams, make_generator, sample_next

log = logging.getLogger(__name__)

# Prompt tokens prefilled per loop turn while streams decode, as a share of one decode step's
# time. Chunk costs are estimates (a later chunk of a long prompt attends to more keys), so the
# share leaves room. Running streams' p95 inter-token latency with 3k-token prompts joining,
# ÷ undisturbed (CPU, `small`, when a chunk still had a forward of its own): 0.75 -> 2.41x,
# 0.6 -> 2.09x, 0.5 -> 1.87x, 0.4 -> 1.54x; the first joiner's first token 1.9 / 2.5 / 3.8 /
# 5.9 s. We hold 2x for running streams and take the slower join.
PREFILL_SHARE = 0.5
# The smallest bite. A chunk with a forward of its own cost ~3 ms whatever its length, and 16
# tokens were the floor (5.5 ms against a 9 ms step: 1.9-2.2x). Riding in the decode step's
# forward, a chunk costs about its attention and little more, so the floor is lower: 3k-token
# prompts joining 4 streams, p95 ÷ undisturbed 1.41-1.49x with 8, 1.21-1.95x with 16.
MIN_BITE = 8
# A new prompt is short, and prefilled whole, if it costs at most this many decode steps or
# this many ms; short ones waiting together go in together, up to the burst limits per loop
# turn. The floors in ms matter while the batch is small: at one stream a step of `small` is
# 9 ms on CPU, so a 110-token prompt (22 ms) went in 22-token bites, and through the gateway
# 8 turns sent at once got their first tokens up to 800 ms apart.
SHORT_PROMPT_STEPS, SHORT_PROMPT_MS = 2, 50.0
SHORT_BURST_STEPS, SHORT_BURST_MS = 8, 200.0
FIRST_BITE = 64  # prompt tokens per turn before the step and prefill costs are measured


@dataclass(frozen=True)
class StepEvent:
    token_id: int
    hidden: torch.Tensor | None  # (H,) float32
    batch_size: int  # sequences that shared this decode step
    reused_tokens: int = 0  # prompt tokens served from the session's KV cache (first event)
    prefill_ms: float = 0.0  # first event only
    finish_reason: str | None = None  # "eos" | "length" | "cancelled" on the last event
    error: IomniError | None = None  # the last event of a sequence that failed


@dataclass
class SequenceRequest:
    input_ids: Sequence[int]
    media: Mapping[int, torch.Tensor]  # placeholder id -> (n, H) rows in prompt order
    params: SamplingParams
    stop_ids: Sequence[int]
    emit: Callable[[StepEvent], None]  # called on the loop thread
    is_cancelled: Callable[[], bool] = lambda: False
    session_id: str = ""
    return_hidden: bool = True


@dataclass(eq=False)  # compared by identity: a batch is these very sequences
class _Active:
    request: SequenceRequest
    cache: DynamicCache
    fed: list[int]  # token ids whose KV is in `cache`
    generator: torch.Generator
    next_token: int = -1
    hidden: torch.Tensor | None = None
    generated: int = 0
    first_event: dict = field(default_factory=dict)


@dataclass(eq=False)  # compared by identity: `_prefilling.remove` must not compare tensors
class _Prefill:
    """A sequence whose prompt is being prefilled, a chunk per loop turn."""

    request: SequenceRequest
    ids: list[int]
    cache: DynamicCache
    embeds: torch.Tensor  # (1, n, H) of the prompt not served from the KV cache
    reused: int
    started: float
    fed: int = 0  # how many of `embeds` are in the cache

    @property
    def left(self) -> int:
        """Prompt tokens not yet prefilled."""
        return self.embeds.shape[1] - self.fed


@dataclass
class _CacheEntry:
    ids: list[int]
    media: dict[int, torch.Tensor]
    cache: DynamicCache

    @property
    def slots(self) -> int:
        """Token slots its KV storage holds: a decoded cache keeps room to grow (up to twice
        its length), and that memory is held as long as the entry is."""
        return held_tokens(self.cache)


class BatcherMetrics:
    """What the loop counts. Plain attributes for tests; the Triton model subclasses it to
    export the same numbers as Prometheus metrics."""

    def __init__(self) -> None:
        self.steps = 0
        self.step_sequences: list[int] = []  # batch size of recent steps (bounded)
        self.generated_tokens = 0
        self.cancelled = 0
        self.kv_hits = 0
        self.kv_misses = 0
        self.kv_reused_tokens = 0

    def on_step(self, batch: int) -> None:
        self.steps += 1
        self.step_sequences = [*self.step_sequences[-255:], batch]

    def on_tokens(self, count: int) -> None:
        """`count` tokens went out in one step (one call per step: each call may cost a
        round trip to the metrics' owner)."""
        self.generated_tokens += count

    def on_cancel(self) -> None:
        self.cancelled += 1

    def on_kv(self, reused: int) -> None:
        """`reused` prompt tokens served from the session's cache (0: a miss)."""
        if reused:
            self.kv_hits += 1
            self.kv_reused_tokens += reused
        else:
            self.kv_misses += 1

    def on_first_token(self, ms: float) -> None:
        """Time from admission to the first token (Triton 2.51 has no such histogram)."""


class SessionKVCache:
    """Per-session KV caches, least recently used evicted beyond `max_tokens` token slots in
    all (what their storage holds, spare room included: the memory they keep)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self.held = 0  # token slots of the entries kept
        self._entries: OrderedDict[str, tuple[_CacheEntry, int]] = OrderedDict()

    def take(self, session_id: str) -> _CacheEntry | None:
        kept = self._entries.pop(session_id, None) if session_id else None
        if kept is None:
            return None
        self.held -= kept[1]
        return kept[0]

    def put(self, session_id: str, entry: _CacheEntry) -> None:
        slots = entry.slots
        if not session_id or slots > self.max_tokens:
            return
        self.take(session_id)
        self._entries[session_id] = (entry, slots)
        self.held += slots
        while self.held > self.max_tokens:
            _, (_, evicted) = self._entries.popitem(last=False)
            self.held -= evicted

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._entries


def reusable_prefix(
    entry: _CacheEntry, ids: Sequence[int], media: Mapping[int, torch.Tensor]
) -> int:
    """Longest prefix of `ids` whose KV in `entry` is valid: same tokens and, at every media
    placeholder inside it, the same embedding rows."""
    limit = min(len(entry.ids), len(ids) - 1)  # keep >= 1 token to compute the next logits
    common = 0
    while common < limit and entry.ids[common] == ids[common]:
        common += 1
    for token_id, rows in media.items():
        cached = entry.media.get(token_id)
        used = sum(1 for t in ids[:common] if t == token_id)
        if used and (
            cached is None or cached.shape[0] < used or not torch.equal(cached[:used], rows[:used])
        ):
            common = min(common, list(ids).index(token_id))
    return common


class ContinuousBatcher:
    def __init__(
        self,
        language_model: Qwen3ForCausalLM,
        max_batch: int = 16,
        kv_cache_tokens: int = 65536,
        idle_wait_s: float = 0.05,
        metrics: BatcherMetrics | None = None,
        drain_deadline: Callable[[], float | None] = lambda: None,
        prefill_chunk: int | None = None,
        pack_rows: bool | None = None,
    ) -> None:
        """`drain_deadline` returns a time.time() deadline once the server is shutting down:
        new sequences are refused, active ones run until it and are then cut.

        Prefill is chunked so it never stalls decoding: while sequences are decoding, each loop
        turn prefills at most the prompt tokens that cost about half a decode step (measured as
        it runs; `prefill_chunk` fixes the number instead), in the same forward as the decode
        step. A running stream's next token is thus about 1.5x as late as undisturbed while a
        long prompt joins, and a new turn still gets a share of every step (`PREFILL_SHARE`).
        A short new prompt (at most `SHORT_PROMPT_STEPS` steps or `SHORT_PROMPT_MS` of
        prefill) goes in whole, with the short ones waiting behind it up to the burst limits.
        With nothing decoding, a prompt is prefilled whole.

        Decoding sequences attend each on its own KV (`pack_rows` False, the default on CPU):
        on CPU that is faster than one padded batch (8 rows of 100-800 tokens, `small`: a step
        3.8 ms against 4.4, 5.1 against 12.7 when one row holds 3000 tokens) and never repacks
        (11-24 ms each time the batch changed). With `pack_rows` (the default on an
        accelerator, where one kernel launch per layer matters more than padding) their caches
        are left-padded into one batch, repacked when the batch changes."""
        if getattr(language_model.model, "has_sliding_layers", False):
            raise Internal("the llm batcher does not support sliding-window attention layers")
        self.prefill_chunk = prefill_chunk
        device = language_model.get_input_embeddings().weight.device
        self.pack_rows = device.type != "cpu" if pack_rows is None else pack_rows
        self._prefilling: list[_Prefill] = []
        self._step_ms = 0.0  # decode step time, moving average
        self._prefill_token_ms = 0.0  # prefill time per token, moving average
        self.drain_deadline = drain_deadline
        self.lm = language_model
        self.max_batch = max_batch
        self.kv = SessionKVCache(kv_cache_tokens)
        self.metrics = metrics or BatcherMetrics()
        self.idle_wait_s = idle_wait_s
        self._inbox: queue.Queue[SequenceRequest] = queue.Queue()
        self._active: list[_Active] = []
        self._batch: BatchCache | None = None  # the decode batch's KV, while it is unchanged
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llm-batcher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop the loop; every sequence still running or waiting ends with `Unavailable`."""
        self._stop.set()
        self._thread.join(timeout=10)

    def submit(self, request: SequenceRequest) -> None:
        self._inbox.put(request)
        if self._stop.is_set():  # the loop may have left before this arrived
            self._refuse_waiting(_stopped())

    @property
    def active(self) -> int:
        return len(self._active)

    # -- the loop ---------------------------------------------------------------------------

    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    if self._draining():
                        continue
                    self._admit(block=not (self._active or self._prefilling))
                    self._turn()
                except Exception as exc:  # a dead loop would hang every client
                    log.exception("llm batcher step failed")
                    self._fail_all(Internal(f"internal error in the llm batcher: {exc}"))
            self._fail_all(_stopped())
            self._refuse_waiting(_stopped())

    def _refuse_waiting(self, error: IomniError) -> None:
        """End every request still in the inbox with `error`."""
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            _emit_error(request, error)

    def _draining(self) -> bool:
        """Shutdown: refuse new work, cut what is still running at the deadline."""
        deadline = self.drain_deadline()
        if deadline is None:
            return False
        self._refuse_waiting(Unavailable("the llm is shutting down"))
        busy = self._active or self._prefilling
        if busy and time.time() >= deadline:
            self._fail_all(Unavailable("the llm shut down before the reply finished"))
        if self._active or self._prefilling:
            self._turn()
        else:
            time.sleep(self.idle_wait_s)
        return True

    def _admit(self, block: bool) -> None:
        while len(self._active) + len(self._prefilling) < self.max_batch:
            try:
                request = (
                    self._inbox.get(timeout=self.idle_wait_s) if block else self._inbox.get_nowait()
                )
            except queue.Empty:
                return
            block = False
            if request.is_cancelled():
                self.metrics.on_cancel()
                request.emit(StepEvent(-1, None, 0, finish_reason="cancelled"))
                continue
            try:
                self._prefilling.append(self._start_prefill(request))
            except IomniError as exc:
                _emit_error(request, exc)
            except Exception as exc:
                log.exception("prefill failed")
                _emit_error(request, Internal(f"prefill failed: {exc}"))

    def _start_prefill(self, request: SequenceRequest) -> _Prefill:
        started = time.perf_counter()
        _check_media(request.media)
        ids = list(request.input_ids)
        entry = self.kv.take(request.session_id)
        reused = reusable_prefix(entry, ids, request.media) if entry else 0
        if entry and reused:
            cache = entry.cache
            surplus = cache.get_seq_length() - reused
            if surplus:
                cache.crop(-surplus)  # transformers: a negative count removes that many
        else:
            cache = DynamicCache(config=self.lm.config)
            reused = 0
        if request.session_id:
            self.metrics.on_kv(reused)
        embeds = self._embed(ids, reused, request.media)
        return _Prefill(request, ids, cache, embeds, reused, started)

    def _bites(self) -> list[tuple[_Prefill, int]]:
        """(prompt, tokens) to prefill this loop turn. Nobody decoding: every prompt whole.
        Otherwise the new short prompts go in whole, wherever they wait in the queue, and the
        long ones (or what is left of one started) share a bite of about half a step, oldest
        first: a new turn's first token never waits behind a long prompt's prefill, and a
        long prompt still moves on every turn however many short ones arrive."""
        if not self._active:
            return [(job, job.left) for job in self._prefilling]
        if self.prefill_chunk:
            return _oldest_first(self._prefilling, self.prefill_chunk)
        if not self._step_ms or not self._prefill_token_ms:
            return _oldest_first(self._prefilling, FIRST_BITE)  # no measurements yet
        short, waiting = self._short_prompts()
        long = [job for job in self._prefilling if job not in short and job not in waiting]
        share = int(PREFILL_SHARE * self._step_ms / self._prefill_token_ms)
        return [(job, job.left) for job in short] + _oldest_first(long, max(MIN_BITE, share))

    def _short_prompts(self) -> tuple[list[_Prefill], list[_Prefill]]:
        """The new short prompts that go in whole this loop turn (the first always, then up to
        the burst limit), and those that wait for the next turn to go in whole. In bites, a
        burst of 8 short text turns (small, CPU) got their first tokens up to 1.5 s apart, to
        spare the running streams - themselves replies a second old - a step each."""
        one = max(SHORT_PROMPT_STEPS * self._step_ms, SHORT_PROMPT_MS)
        burst = max(SHORT_BURST_STEPS * self._step_ms, SHORT_BURST_MS)
        now: list[_Prefill] = []
        later: list[_Prefill] = []
        tokens = 0
        for job in self._prefilling:
            prompt = job.embeds.shape[1]
            if job.fed or prompt * self._prefill_token_ms > one:
                continue
            if now and (tokens + prompt) * self._prefill_token_ms > burst:
                later.append(job)
                continue
            now.append(job)
            tokens += prompt
        return now, later

    def _turn(self) -> None:
        """One loop turn: every decoding sequence's pending token goes out, then ONE forward
        runs their next step together with this turn's prompt chunks (`forward_groups`: the
        weights are read once, where a chunk's own forward used to cost the running streams a
        second pass over them)."""
        self._drop_cancelled()
        started = time.perf_counter()
        decoding = self._emit_all() if self._active else []
        bites = self._bites()  # after the finished streams left: with none left, whole
        if decoding or bites:
            self._forward(decoding, bites)
        self._measure(bool(decoding), sum(take for _, take in bites), started)

    def _measure(self, decoded: bool, prefilled: int, started: float) -> None:
        """Keep the step time and the per-token prefill cost the chunk budget is made of; a
        turn with both charges the prefill what it cost beyond a plain step."""
        elapsed = (time.perf_counter() - started) * 1000
        if not prefilled:
            if decoded:
                self._step_ms = _average(self._step_ms, elapsed)
            return
        # A noisy step can make a chunk look free; never below a quarter step, so the next
        # budget at most doubles.
        extra = max(elapsed - self._step_ms, self._step_ms / 4) if decoded else elapsed
        # A token costs more as the prompt grows, so the recent turns weigh most.
        sample = extra / prefilled
        self._prefill_token_ms = _average(self._prefill_token_ms, sample, weight=0.5)

    def _begin_decoding(
        self, job: _Prefill, hidden: torch.Tensor, logits: torch.Tensor, argmax: int
    ) -> None:
        # Already growing (`_forward`): the first decode steps append into its headroom.
        seq = _Active(job.request, job.cache, job.ids, make_generator(job.request.params))
        self._choose(seq, hidden, logits, argmax)
        prefill_ms = (time.perf_counter() - job.started) * 1000
        seq.first_event = {"reused_tokens": job.reused, "prefill_ms": prefill_ms}
        self.metrics.on_first_token(prefill_ms)
        self._active.append(seq)

    def _embed(self, ids: list[int], start: int, media: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """Embeddings of ids[start:], media rows spliced at their placeholders."""
        table = self.lm.get_input_embeddings()
        suffix = torch.tensor(ids[start:], dtype=torch.long, device=table.weight.device)
        embeds = table(suffix.unsqueeze(0))
        for token_id, rows in media.items():
            mask = suffix == token_id
            count = int(mask.sum())
            if count:
                offset = sum(1 for t in ids[:start] if t == token_id)
                embeds[0, mask] = rows[offset : offset + count].to(embeds)
        return embeds

    def _choose(
        self,
        seq: _Active,
        hidden: torch.Tensor,
        logits: torch.Tensor,
        argmax: int,
    ) -> None:
        """Pick the sequence's next token (`argmax`: its greedy pick, already on the host)."""
        params = seq.request.params
        seq.next_token = argmax if params.greedy else sample_next(logits, params, seq.generator)
        seq.hidden = hidden.float() if seq.request.return_hidden else None

    def _emit_all(self) -> list[_Active]:
        """Emit every decoding sequence's pending token; those not finished decode on."""
        batch = len(self._active)
        self.metrics.on_step(batch)
        survivors = [seq for seq in self._active if self._emit_pending(seq, batch)]
        self.metrics.on_tokens(batch)
        self._active = survivors
        return survivors

    def _emit_pending(self, seq: _Active, batch: int) -> bool:
        request = seq.request
        token = seq.next_token
        seq.generated += 1
        reason = None
        if token in request.stop_ids:
            reason = "eos"
        elif seq.generated >= request.params.max_new_tokens:
            reason = "length"
        request.emit(StepEvent(token, seq.hidden, batch, finish_reason=reason, **seq.first_event))
        seq.first_event = {}
        if reason is not None:
            self._retire(seq)
            return False
        return True

    def _forward(self, decoding: list[_Active], bites: list[tuple[_Prefill, int]]) -> None:
        groups = self._decode_groups(decoding) if decoding else []
        decode_groups = len(groups)
        for job, take in bites:
            cached = job.cache.get_seq_length()
            groups.append(
                TokenGroup(
                    job.embeds[:, job.fed : job.fed + take],
                    job.cache,
                    torch.arange(cached, cached + take, device=job.embeds.device)[None],
                    prefix_causal_mask(cached, take, job.embeds.device),
                )
            )
        hidden = forward_groups(self.lm.model, groups)
        finished = []
        for (job, take), out in zip(bites, hidden[decode_groups:], strict=True):
            job.cache, job.fed = as_growing(job.cache), job.fed + take
            if job.fed == job.embeds.shape[1]:
                finished.append((job, out[0, -1]))
        # Every row that needs logits in one projection: its weight is read once.
        rows = [row for out in hidden[:decode_groups] for row in out[:, -1]]
        rows += [last for _, last in finished]
        if not rows:
            return
        logits = self.lm.lm_head(torch.stack(rows)).float()
        # The greedy picks in one copy to the host: on a GPU, each row's own `int(argmax)`
        # would wait for the device once more.
        argmax = logits.argmax(-1).tolist()
        decoded = len(decoding)
        for row, seq in enumerate(list(decoding)):  # `decoding` is `_active`: a copy
            try:
                self._choose(seq, rows[row], logits[row], argmax[row])
            except Exception as exc:  # this sequence's own (sampling); the others go on
                self._active.remove(seq)
                self._fail_one(seq.request, exc)
        for row, (job, last) in enumerate(finished, start=decoded):
            self._prefilling.remove(job)
            try:
                self._begin_decoding(job, last, logits[row], argmax[row])
            except Exception as exc:
                self._fail_one(job.request, exc)

    def _fail_one(self, request: SequenceRequest, exc: Exception) -> None:
        log.exception("llm sequence failed")
        error = exc if isinstance(exc, IomniError) else Internal(f"the llm failed on it: {exc}")
        _emit_error(request, error)

    def _decode_groups(self, batch: list[_Active]) -> list[TokenGroup]:
        """The decoding sequences' next tokens: a group per sequence on its own KV, or, with
        `pack_rows`, one group on the batch's KV left-padded into one (repacked when the batch
        changes)."""
        table = self.lm.get_input_embeddings()
        tokens = torch.tensor([[s.next_token] for s in batch], device=table.weight.device)
        embeds = table(tokens)
        for seq in batch:
            seq.fed.append(seq.next_token)
        if not self.pack_rows or len(batch) == 1:
            self._unbatch()
            return [
                TokenGroup(embeds[row : row + 1], seq.cache, _next_position(seq.cache))
                for row, seq in enumerate(batch)
            ]
        if self._batch is None or self._batch.rows != batch:
            self._unbatch()
            self._batch = BatchCache.pack(batch)
        state = self._batch
        mask = state.grow_mask().bool()[:, None, None, :]
        return [TokenGroup(embeds, state.cache, state.positions(), mask)]

    def _unbatch(self) -> None:
        """Hand each sequence of the batch its own cache back (the batch is changing)."""
        if self._batch is not None:
            self._batch.unpack()
            self._batch = None

    def _drop_cancelled(self) -> None:
        waiting = []
        for job in self._prefilling:
            if job.request.is_cancelled():
                self.metrics.on_cancel()
                job.request.emit(StepEvent(-1, None, 0, finish_reason="cancelled"))
            else:
                waiting.append(job)
        self._prefilling = waiting
        kept = []
        for seq in self._active:
            if seq.request.is_cancelled():
                self.metrics.on_cancel()
                seq.request.emit(StepEvent(-1, None, len(self._active), finish_reason="cancelled"))
                self._retire(seq)
            else:
                kept.append(seq)
        self._active = kept

    def _retire(self, seq: _Active) -> None:
        if self._batch is not None and seq in self._batch.rows:
            self._unbatch()
        request = seq.request
        self.kv.put(
            request.session_id,
            _CacheEntry(seq.fed, {k: v for k, v in request.media.items()}, seq.cache),
        )

    def _fail_all(self, error: IomniError) -> None:
        for request in [s.request for s in self._active] + [j.request for j in self._prefilling]:
            _emit_error(request, error)
        self._active = []
        self._prefilling = []
        self._batch = None


def _oldest_first(jobs: list[_Prefill], budget: int) -> list[tuple[_Prefill, int]]:
    """(prompt, tokens) up to `budget` tokens in all, the oldest prompt first."""
    bites = []
    for job in jobs:
        if budget <= 0:
            break
        take = min(budget, job.left)
        bites.append((job, take))
        budget -= take
    return bites


def _check_media(media: Mapping[int, torch.Tensor]) -> None:
    """NaN or infinite rows would poison the sampler (or, greedy, silently the reply)."""
    for token_id, rows in media.items():
        if not bool(torch.isfinite(rows).all()):
            raise InvalidInput(
                f"the media rows for placeholder {token_id} contain NaN or infinite values; "
                "re-encode the media (a raw client must send finite float32 rows)"
            )


def _stopped() -> Unavailable:
    return Unavailable("the llm batcher stopped (the model is unloading or the server exiting)")


def _emit_error(request: SequenceRequest, error: IomniError) -> None:
    try:
        request.emit(StepEvent(-1, None, 0, error=error))
    except Exception:
        log.exception("could not report a failure to a client")


def _next_position(cache: DynamicCache) -> torch.Tensor:
    return torch.tensor([[cache.get_seq_length()]], device=cache.layers[0].keys.device)


def _average(current: float, sample: float, weight: float = 0.2) -> float:
    return sample if not current else (1 - weight) * current + weight * sample
