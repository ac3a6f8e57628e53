"""One utterance of streaming speech: text groups in, 24 kHz PCM chunks out.

The CosyVoice2 token2wav loop: whenever `hop + lookahead` speech tokens beyond the last chunk
exist, the flow is re-run over all tokens so far (chunk-causal masks and fixed noise make the
earlier frames identical) and the new `2 * hop` mel frames go to the vocoder, which cross-fades
chunk seams. The final call renders what is left with no look-ahead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from iomni.errors import InvalidInput
from iomni.model.speech.flow import CausalMaskedDiffWithXvec
from iomni.model.speech.flow_stream import FlowStream
from iomni.model.speech.hift import HiFTGenerator, HiFTStreamer
from iomni.model.speech.voicelm import BistreamDecoder, VoiceLM, decode_groups

if TYPE_CHECKING:
    from iomni.model.interactive_omni import InteractiveOmniModel

SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 2 mel frames x 480 samples: 40 ms per 25 Hz speech token
MAX_FLOW_STEPS = 50


# A non-final vocoder push holds back 4 tokens' samples for the cross-fade: a first chunk must
# be longer than that to emit anything.
MIN_FIRST_CHUNK = 5


@dataclass(frozen=True)
class SpeechSettings:
    """How a reply is cut into chunks and rendered. The defaults are CosyVoice2's; the two
    latency settings change the audio and are off (0) by default (docs/speech.md)."""

    token_hop: int = 25  # speech tokens per rendered chunk (1 s of audio)
    lookahead: int = 3  # tokens the flow's pre-lookahead layer needs beyond the chunk
    # Speech tokens in the first chunk (0: token_hop). Fewer: first audio after the first text
    # group instead of the second; the first chunk is rendered from a partial flow chunk.
    first_chunk_tokens: int = 0
    flow_steps: int = 0  # Euler steps of the flow's ODE (0: the checkpoint's n_timesteps)

    def __post_init__(self) -> None:
        first = self.first_chunk_tokens
        if first and not MIN_FIRST_CHUNK <= first <= self.token_hop:
            raise InvalidInput(
                f"first_chunk_tokens must be 0 (off) or {MIN_FIRST_CHUNK}..{self.token_hop}, "
                f"not {first}"
            )
        if not 0 <= self.flow_steps <= MAX_FLOW_STEPS:
            raise InvalidInput(
                f"flow_steps must be 0 (the checkpoint's) or 1..{MAX_FLOW_STEPS}, "
                f"not {self.flow_steps}"
            )

    def chunk_end(self, offset: int) -> int:
        """Where the chunk starting at token `offset` ends: the first may be short; later ones
        end on multiples of `token_hop`, the flow's own chunk grid, so none is re-rendered."""
        if offset == 0 and self.first_chunk_tokens:
            return self.first_chunk_tokens
        return (offset // self.token_hop + 1) * self.token_hop


class SpeechSession:
    def __init__(
        self,
        voicelm: VoiceLM,
        flow: CausalMaskedDiffWithXvec,
        hift: HiFTGenerator,
        speaker: torch.Tensor,
        seed: int = 0,
        settings: SpeechSettings | None = None,
    ) -> None:
        self.flow = flow
        self.settings = settings or SpeechSettings()
        self.speaker = speaker.reshape(1, -1).to(next(flow.parameters()))
        self.lm_decoder = BistreamDecoder(voicelm, torch.Generator().manual_seed(seed))
        self.vocoder = HiFTStreamer(hift, torch.Generator().manual_seed(seed + 1))
        self.flow_stream = FlowStream(flow, self.speaker, steps=self.settings.flow_steps)
        self.tokens: list[int] = []
        self.text_tokens = 0  # text tokens received
        self.offset = 0  # tokens already rendered to audio
        self.samples_out = 0
        self.done = False
        self.first_mel: tuple[int, torch.Tensor] | None = None  # (upto, mel) rendered in a batch

    @classmethod
    def of_model(
        cls,
        model: InteractiveOmniModel,
        speaker: torch.Tensor | None = None,
        seed: int = 0,
        settings: SpeechSettings | None = None,
    ) -> SpeechSession:
        """A reply in `speaker`'s voice (an x-vector), or the checkpoint's default voice."""
        voice = model.default_speaker_embedding.detach() if speaker is None else speaker
        return cls(model.voicelm, model.flow, model.hifigan, voice, seed=seed, settings=settings)

    @torch.inference_mode()
    def push_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> list[np.ndarray]:
        """Feed LLM text tokens with their hidden states; return audio that became ready."""
        return list(self.iter_text(token_ids, hidden))

    def iter_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> Iterator[np.ndarray]:
        """`push_text`, each chunk yielded as soon as it is rendered (call under
        `torch.inference_mode`)."""
        self.add_text(token_ids, hidden)
        decode_together([self])
        yield from self.iter_ready()

    def add_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> int:
        """Queue text for `decode_together` (which may batch it with other replies'); returns
        the text tokens received so far, a mark for `iter_ready`."""
        self.lm_decoder.add_text(token_ids, hidden)
        self.text_tokens += len(token_ids)
        return self.text_tokens

    def iter_ready(self, text_mark: int | None = None) -> Iterator[np.ndarray]:
        """Render the chunks whose speech tokens (and look-ahead) are decoded, each yielded as
        soon as it is rendered (call under `torch.inference_mode`); with a mark from
        `add_text`, only those the text up to it makes ready (what that call would have
        rendered alone, so each request's answer is as early as if served alone)."""
        decoded = len(self.tokens)
        if text_mark is not None:
            decoded = min(decoded, self.lm_decoder.speech_tokens_for(text_mark))
        lookahead = self.settings.lookahead
        while decoded >= (end := self.settings.chunk_end(self.offset)) + lookahead:
            chunk = self._render(end + lookahead, final=False)
            self.offset = end
            if chunk.size:
                yield chunk

    def first_chunk_text_in(self) -> bool:
        """Whether the text received so far makes the first chunk ready once decoded, and
        that chunk is not rendered yet: more text can wait until it is."""
        upto = self.settings.chunk_end(0) + self.settings.lookahead
        return not self.offset and self.lm_decoder.speech_tokens_for(self.text_tokens) >= upto

    def first_chunk_upto(self, text_mark: int) -> int | None:
        """The tokens the first chunk's render takes, if the text up to `text_mark` makes the
        first chunk ready and nothing is rendered yet; else None."""
        if self.offset or self.done or self.first_mel is not None:
            return None
        decoded = min(len(self.tokens), self.lm_decoder.speech_tokens_for(text_mark))
        upto = self.settings.chunk_end(0) + self.settings.lookahead
        return upto if decoded >= upto else None

    @torch.inference_mode()
    def finish(self) -> list[np.ndarray]:
        """The text is complete: decode the tail and render everything left."""
        return list(self.iter_finish())

    def iter_finish(self) -> Iterator[np.ndarray]:
        """`finish`, each chunk yielded as soon as it is rendered (call under
        `torch.inference_mode`). The tail is cut into chunks as if its tokens had streamed
        in: rendered whole, the last chunk of a reply was up to two seconds of audio in one
        render, the largest wait between its chunks."""
        if self.done:
            return
        self.done = True
        self.tokens += self.lm_decoder.finish()
        yield from self.iter_ready()
        if len(self.tokens) == self.offset:
            return
        chunk = self._render(len(self.tokens), final=True)
        self.offset = len(self.tokens)
        if chunk.size:
            yield chunk

    def _render(self, upto: int, final: bool) -> np.ndarray:
        # Only new chunks are computed: the flow keeps the states of those it rendered before.
        if self.first_mel is not None and not final and upto == self.first_mel[0]:
            start, mel = 0, self.first_mel[1]  # rendered with other replies' first chunks
            self.first_mel = None
        else:
            start, mel = self.flow_stream.render(self.tokens[:upto], finalize=final)
        ratio = self.flow_stream.ratio
        wav = self.vocoder.push(mel[:, :, ratio * (self.offset - start) :], final=final)
        samples = wav.reshape(-1).float().cpu().numpy()
        self.samples_out += samples.size
        return samples


def decode_together(sessions: Sequence[SpeechSession]) -> None:
    """Decode every complete text group the sessions hold into speech tokens, the sessions'
    groups batched step by step (same tokens as each alone: `decode_groups`)."""
    while ready := [s for s in sessions if s.lm_decoder.has_group()]:
        groups = decode_groups([s.lm_decoder for s in ready])
        for session, tokens in zip(ready, groups, strict=True):
            session.tokens += tokens


def render_first_together(marked: Sequence[tuple[SpeechSession, int]]) -> list[int]:
    """Render the flow of the first chunks the text marks make ready, the sessions' together
    (`FlowStream.render_first_together`: cheaper per reply on CPU); each session's
    `iter_ready` then only vocodes its own. Sessions with a single ready first chunk, or
    whose first chunk is not ready, are left to `iter_ready`. Returns the replies in each
    batched pass."""
    ready: dict[SpeechSettings, dict[SpeechSession, int]] = {}  # settings fix upto and grid
    passes = []
    for session, mark in marked:
        if (upto := session.first_chunk_upto(mark)) is not None:
            ready.setdefault(session.settings, {})[session] = upto
    for by_session in ready.values():
        if len(by_session) < 2:
            continue
        sessions = list(by_session)
        upto = by_session[sessions[0]]  # one value per settings
        streams = [s.flow_stream for s in sessions]
        mels = FlowStream.render_first_together(streams, [s.tokens[:upto] for s in sessions])
        for session, mel in zip(sessions, mels, strict=True):
            session.first_mel = (upto, mel)
        passes.append(len(sessions))
    return passes


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
