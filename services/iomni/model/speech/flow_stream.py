"""Streaming the flow without re-rendering what is already done: per-chunk cost stays flat.

`CausalMaskedDiffWithXvec.inference` renders a whole utterance; streaming used to call it on
every prefix, so a reply's cost grew with the square of its length. Everything in the flow is
chunk-causal or causal (attention sees only earlier chunks and its own; convolutions see only
earlier frames), so the states of complete chunks never change once computed. `FlowStream`
keeps them: per attention layer the keys and values of complete chunks, per causal convolution
its last input frames, for the encoder once and for the estimator once per ODE step (and both
classifier-free-guidance rows). A call then computes only the new frames. The output equals
`inference` on the same prefix (checked in the tests); attention over the history still grows,
but it is the only part that does.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from iomni.model.speech.flow import (
    ESTIMATOR_MASK_BIAS,
    Attention,
    BasicTransformerBlock,
    CausalBlock1D,
    CausalConv1d,
    CausalMaskedDiffWithXvec,
    CausalResnetBlock1D,
    ConformerEncoderLayer,
    LinearEmbed,
)

Key = tuple[int, ...]


def _allowed(rows: range, keys: int, chunk: int, device: torch.device) -> torch.Tensor:
    """(len(rows), keys) bool: query i may see key j < (i // chunk + 1) * chunk."""
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(keys, device=device)[None, :]
    return j < (i // chunk + 1) * chunk


class _Cache:
    """States of positions before `kept`: K/V per attention, input tails per convolution."""

    def __init__(self) -> None:
        self.kv: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tails: dict[Key, torch.Tensor] = {}
        self.kept = 0  # positions whose states are cached (a whole number of chunks)

    def rows(self, index: torch.Tensor) -> _Cache:
        """The states of batch rows `index`, as a cache of their own."""
        picked = _Cache()
        picked.kv = {key: (k[index], v[index]) for key, (k, v) in self.kv.items()}
        picked.tails = {key: tail[index] for key, tail in self.tails.items()}
        picked.kept = self.kept
        return picked


class FlowStream:
    """One utterance's flow, rendered incrementally. `render(ids, finalize)` takes the tokens
    so far (the last `pre_lookahead_len` are look-ahead unless `finalize`) and returns the mel
    frames from `2 * start` on, where `start` is returned with them."""

    def __init__(
        self, flow: CausalMaskedDiffWithXvec, speaker: torch.Tensor, steps: int = 0
    ) -> None:
        self.flow = flow
        self.grid = flow.decoder.time_grid(steps or None)
        config = flow.config
        self.lookahead = config.pre_lookahead_len
        self.ratio = config.token_mel_ratio
        self.token_chunk = config.encoder.static_chunk_size
        self.frame_chunk = config.estimator.static_chunk_size
        weight = flow.input_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype
        spks = F.normalize(speaker.to(device=self.device, dtype=torch.float32), p=2, dim=1)
        self.spks = flow.spk_embed_affine_layer(spks.to(self.dtype))
        self.encoder = _Cache()
        self.pre_tail: torch.Tensor | None = None  # pre-lookahead conv1 outputs before `kept`
        self.steps: list[_Cache] = []  # the estimator, one cache per ODE step

    @torch.inference_mode()
    def render(self, ids: list[int], finalize: bool) -> tuple[int, torch.Tensor]:
        tokens = torch.tensor([ids], dtype=torch.long)
        rendered = self.flow._check(
            tokens, self.spks.new_zeros(1, self.flow.config.spk_embed_dim), finalize
        )
        start = self.encoder.kept
        return start, self._render_rows(tokens, start, rendered, finalize)

    @classmethod
    @torch.inference_mode()
    def render_first_together(
        cls, streams: Sequence[FlowStream], ids: Sequence[list[int]]
    ) -> list[torch.Tensor]:
        """Each stream's first `render(ids[i], finalize=False)`, in one batched pass: the mel
        of each (to float rounding, ~1e-6) and the states each keeps for its next chunk.

        On CPU a batch of replies' first chunks costs less per reply than one at a time (on
        `small`, one core: 207 ms alone, 135 ms each for four); later chunks are not batched,
        their histories differ in length. All streams must be fresh, of one flow and grid, and
        their ids of one length."""
        first = streams[0]
        if any(s.flow is not first.flow or s.grid != first.grid for s in streams):
            raise ValueError("streams rendered together must share the flow and its ODE grid")
        if any(s.encoder.kept or s.steps or s.pre_tail is not None for s in streams):
            raise ValueError("only first chunks are rendered together")
        if len({len(i) for i in ids}) != 1 or len(ids) != len(streams):
            raise ValueError("one token list per stream, all of one length")
        rows = [torch.tensor([i], dtype=torch.long) for i in ids]
        speaker = first.spks.new_zeros(1, first.flow.config.spk_embed_dim)
        rendered = max(first.flow._check(r, speaker, False) for r in rows)  # all equal
        batch = copy.copy(first)  # the first stream's settings, with the batch's own states
        batch.spks = torch.cat([s.spks for s in streams])
        batch.encoder, batch.pre_tail, batch.steps = _Cache(), None, []
        mel = batch._render_rows(torch.cat(rows), 0, rendered, False)
        size = len(streams)
        for index, stream in enumerate(streams):
            pick = torch.tensor([index], device=first.device)
            stream.encoder = batch.encoder.rows(pick)
            stream.pre_tail = batch.pre_tail.index_select(0, pick)
            both = torch.tensor([index, size + index], device=first.device)  # CFG: cond, uncond
            stream.steps = [cache.rows(both) for cache in batch.steps]
        return list(mel.split(1))

    def _render_rows(
        self, tokens: torch.Tensor, start: int, rendered: int, finalize: bool
    ) -> torch.Tensor:
        # Complete chunks are final; a partial chunk is recomputed next time.
        keep = rendered if finalize else rendered // self.token_chunk * self.token_chunk
        mu = self._encode(tokens.clamp(min=0), start, rendered, keep, finalize)
        return self._decode(mu, start * self.ratio, keep * self.ratio)

    # -- encoder ----------------------------------------------------------------------------

    def _encode(
        self, tokens: torch.Tensor, start: int, rendered: int, keep: int, finalize: bool
    ) -> torch.Tensor:
        enc = self.flow.encoder
        embedded = self.flow.input_embedding(tokens.to(self.device))
        x = enc.embed(embedded[:, start:rendered])
        context = None if finalize else enc.embed(embedded[:, rendered:])
        x = self._pre_lookahead(x, context, start, keep)
        cache = self.encoder
        for index, layer in enumerate(enc.encoders):
            x = self._conformer(
                layer, enc.embed, x, (0, index), cache, start, keep, self.token_chunk
            )
        up = enc.up_layer
        ups = F.interpolate(x.transpose(1, 2), scale_factor=float(up.stride), mode="nearest")
        ups = self._causal(
            up.conv, ups, (1,), cache, start * self.ratio, keep * self.ratio, 2 * up.stride
        )
        x = enc.up_embed(ups.transpose(1, 2))
        for index, layer in enumerate(enc.up_encoders):
            x = self._conformer(
                layer,
                enc.up_embed,
                x,
                (2, index),
                cache,
                start * self.ratio,
                keep * self.ratio,
                self.token_chunk * self.ratio,
            )
        cache.kept = keep
        h = enc.after_norm(x)
        return self.flow.encoder_proj(h).transpose(1, 2)

    def _pre_lookahead(
        self, x: torch.Tensor, context: torch.Tensor | None, start: int, keep: int
    ) -> torch.Tensor:
        layer = self.flow.encoder.pre_lookahead_layer
        out = x.transpose(1, 2)
        if context is not None:
            out = torch.cat([out, context.transpose(1, 2)], dim=2)
        out = F.pad(out, (0, x.shape[1] + layer.lookahead - out.shape[2]))
        conv1 = F.leaky_relu(layer.conv1(out), negative_slope=0.01)  # (B, C, L)
        width = layer.conv2.kernel_size[0] - 1
        tail = (
            self.pre_tail if self.pre_tail is not None else conv1.new_zeros(*conv1.shape[:2], width)
        )
        full = torch.cat([tail, conv1], dim=2)
        cut = width + keep - start
        self.pre_tail = full[:, :, cut - width : cut]
        return layer.conv2(full).transpose(1, 2) + x

    def _conformer(
        self,
        layer: ConformerEncoderLayer,
        embed: LinearEmbed,
        x: torch.Tensor,
        key: Key,
        cache: _Cache,
        start: int,
        keep: int,
        chunk: int,
    ) -> torch.Tensor:
        attn = layer.self_attn
        h = layer.norm_mha(x)
        q = attn._heads(attn.linear_q(h)).transpose(1, 2)  # (B, H, n, d)
        k = attn._heads(attn.linear_k(h)).transpose(1, 2)
        v = attn._heads(attn.linear_v(h)).transpose(1, 2)
        k, v = self._kv(cache, key, k, v, start, keep)
        total = k.shape[2]
        pos = embed.rel_pos(total, x)  # relative positions total-1 ... -(total-1)
        p = attn._heads(attn.linear_pos(pos)).transpose(1, 2)  # (1, H, 2T-1, d)
        u, w = attn.pos_bias_u[None, :, None, :], attn.pos_bias_v[None, :, None, :]
        content = (q + u) @ k.transpose(-2, -1)  # (B, H, n, T)
        table = (q + w) @ p.transpose(-2, -1)  # (B, H, n, 2T-1)
        # Query i, key j: the table row of relative position i - j is (T - 1) - (i - j).
        rows = torch.arange(start, start + x.shape[1], device=x.device)[:, None]
        index = (total - 1 - rows) + torch.arange(total, device=x.device)[None, :]
        position = table.gather(-1, index.expand(*table.shape[:2], -1, -1))
        scores = (content + position) / math.sqrt(attn.d_k)
        blocked = ~_allowed(range(start, start + x.shape[1]), total, chunk, x.device)
        weights = scores.masked_fill(blocked, -math.inf).softmax(dim=-1).masked_fill(blocked, 0)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        x = x + attn.linear_out(out)
        return x + layer.feed_forward(layer.norm_ff(x))

    # -- estimator --------------------------------------------------------------------------

    def _decode(self, mu: torch.Tensor, start: int, keep: int) -> torch.Tensor:
        cfm = self.flow.decoder
        rows, _, frames = mu.shape
        noise = cfm.noise(start + frames, mu.device, torch.float32)[:, :, start:]
        x = noise.expand(rows, -1, -1)
        spks = self.spks[:, :, None].expand(-1, -1, frames)
        static = torch.cat([mu, spks, torch.zeros_like(mu)], dim=1)
        static = torch.cat([static, torch.zeros_like(static)], dim=0)
        rate = cfm.params.inference_cfg_rate
        grid = self.grid
        while len(self.steps) < len(grid) - 1:
            self.steps.append(_Cache())
        for step, (t0, t1) in enumerate(zip(grid[:-1], grid[1:], strict=True)):
            x_in = torch.cat([x, x], dim=0).to(self.dtype)
            t = torch.full((2 * rows,), t0, device=mu.device, dtype=torch.float32)
            v = self._estimate(torch.cat([x_in, static], dim=1), t, self.steps[step], start, keep)
            v = v.float()
            x = x + (t1 - t0) * ((1.0 + rate) * v[:rows] - rate * v[rows:])
        return x

    def _estimate(
        self, x: torch.Tensor, t: torch.Tensor, cache: _Cache, start: int, keep: int
    ) -> torch.Tensor:
        est = self.flow.decoder.estimator
        t_emb = est.time_mlp(est.time_embedding(t).to(self.dtype))
        frames = x.shape[2]
        allowed = _allowed(range(start, start + frames), start + frames, self.frame_chunk, x.device)
        bias = (~allowed).to(self.dtype) * ESTIMATOR_MASK_BIAS
        ((resnet, blocks, down),) = est.down_blocks
        x = self._resnet(resnet, x, t_emb, (10,), cache, start, keep)
        x = self._transformers(blocks, x, (11,), cache, start, keep, bias)
        skip = x
        x = self._causal(down, x, (12,), cache, start, keep)
        for index, (resnet, blocks) in enumerate(est.mid_blocks):
            x = self._resnet(resnet, x, t_emb, (20, index), cache, start, keep)
            x = self._transformers(blocks, x, (21, index), cache, start, keep, bias)
        ((resnet, blocks, up),) = est.up_blocks
        x = torch.cat([x[:, :, : skip.shape[-1]], skip], dim=1)
        x = self._resnet(resnet, x, t_emb, (30,), cache, start, keep)
        x = self._transformers(blocks, x, (31,), cache, start, keep, bias)
        x = self._causal(up, x, (32,), cache, start, keep)
        x = self._block(est.final_block, x, (40,), cache, start, keep)
        cache.kept = keep
        return est.final_proj(x)

    def _resnet(
        self,
        block: CausalResnetBlock1D,
        x: torch.Tensor,
        t_emb: torch.Tensor,
        key: Key,
        cache: _Cache,
        start: int,
        keep: int,
    ) -> torch.Tensor:
        h = (
            self._block(block.block1, x, (*key, 1), cache, start, keep)
            + block.mlp(t_emb)[:, :, None]
        )
        return self._block(block.block2, h, (*key, 2), cache, start, keep) + block.res_conv(x)

    def _block(
        self, block: CausalBlock1D, x: torch.Tensor, key: Key, cache: _Cache, start: int, keep: int
    ) -> torch.Tensor:
        conv, _, norm, _, mish = block.block
        h = self._causal(conv, x, key, cache, start, keep)
        return mish(norm(h.transpose(1, 2)).transpose(1, 2))

    def _transformers(
        self,
        blocks: torch.nn.ModuleList,
        x: torch.Tensor,
        key: Key,
        cache: _Cache,
        start: int,
        keep: int,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        x = x.transpose(1, 2)
        for index, block in enumerate(blocks):
            x = self._transformer(block, x, (*key, index), cache, start, keep, bias)
        return x.transpose(1, 2)

    def _transformer(
        self,
        block: BasicTransformerBlock,
        x: torch.Tensor,
        key: Key,
        cache: _Cache,
        start: int,
        keep: int,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        attn: Attention = block.attn1
        h = block.norm1(x)
        b, n, _ = h.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, n, attn.heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(h)), split(attn.to_k(h)), split(attn.to_v(h))
        k, v = self._kv(cache, key, k, v, start, keep)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = x + attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1))
        return x + block.ff(block.norm3(x))

    # -- the caches ---------------------------------------------------------------------------

    @staticmethod
    def _kv(
        cache: _Cache, key: Key, k: torch.Tensor, v: torch.Tensor, start: int, keep: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of all positions so far; those before `keep` are remembered."""
        held = cache.kv.get(key)
        if held is not None:
            k, v = torch.cat([held[0], k], dim=2), torch.cat([held[1], v], dim=2)
        cache.kv[key] = (k[:, :, :keep], v[:, :, :keep])
        return k, v

    @staticmethod
    def _causal(
        conv: torch.nn.Conv1d,
        x: torch.Tensor,
        key: Key,
        cache: _Cache,
        start: int,
        keep: int,
        width: int | None = None,
    ) -> torch.Tensor:
        """A causal convolution over new frames, its left context from the cache."""
        width = conv.kernel_size[0] - 1 if width is None else width
        tail = cache.tails.get(key)
        if tail is None:
            tail = x.new_zeros(*x.shape[:2], width)
        full = torch.cat([tail, x], dim=2)
        cut = width + keep - start
        cache.tails[key] = full[:, :, cut - width : cut]
        if isinstance(conv, CausalConv1d):
            return torch.nn.Conv1d.forward(conv, full)
        return conv(full)
