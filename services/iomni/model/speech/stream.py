"""One utterance of streaming speech: text groups in, 24 kHz PCM chunks out.

The CosyVoice2 token2wav loop: whenever `hop + lookahead` speech tokens beyond the last chunk
exist, the flow is re-run over all tokens so far (chunk-causal masks and fixed noise make the
earlier frames identical) and the new `2 * hop` mel frames go to the vocoder, which cross-fades
chunk seams. The final call renders what is left with no look-ahead.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from iomni.model.speech.flow import CausalMaskedDiffWithXvec
from iomni.model.speech.flow_stream import FlowStream
from iomni.model.speech.hift import HiFTGenerator, HiFTStreamer
from iomni.model.speech.voicelm import BistreamDecoder, VoiceLM

SAMPLE_RATE = 24000
SAMPLES_PER_TOKEN = 960  # 2 mel frames x 480 samples: 40 ms per 25 Hz speech token


@dataclass(frozen=True)
class SpeechSettings:
    token_hop: int = 25  # speech tokens per rendered chunk (1 s of audio)
    lookahead: int = 3  # tokens the flow's pre-lookahead layer needs beyond the chunk


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
        self.speaker = speaker.reshape(1, -1).to(next(flow.parameters()).dtype)
        self.lm_decoder = BistreamDecoder(voicelm, torch.Generator().manual_seed(seed))
        self.vocoder = HiFTStreamer(hift, torch.Generator().manual_seed(seed + 1))
        self.flow_stream = FlowStream(flow, self.speaker)
        self.tokens: list[int] = []
        self.offset = 0  # tokens already rendered to audio
        self.samples_out = 0
        self.done = False

    @torch.inference_mode()
    def push_text(self, token_ids: Sequence[int], hidden: torch.Tensor) -> list[np.ndarray]:
        """Feed LLM text tokens with their hidden states; return audio that became ready."""
        self.tokens += self.lm_decoder.push_text(token_ids, hidden)
        chunks = []
        hop, lookahead = self.settings.token_hop, self.settings.lookahead
        while len(self.tokens) - self.offset >= hop + lookahead:
            chunks.append(self._render(self.offset + hop + lookahead, final=False))
            self.offset += hop
        return [c for c in chunks if c.size]

    @torch.inference_mode()
    def finish(self) -> list[np.ndarray]:
        """The text is complete: decode the tail and render everything left."""
        if self.done:
            return []
        self.done = True
        self.tokens += self.lm_decoder.finish()
        if len(self.tokens) == self.offset:
            return []
        chunk = self._render(len(self.tokens), final=True)
        self.offset = len(self.tokens)
        return [chunk] if chunk.size else []

    def _render(self, upto: int, final: bool) -> np.ndarray:
        # Only new chunks are computed: the flow keeps the states of those it rendered before.
        start, mel = self.flow_stream.render(self.tokens[:upto], finalize=final)
        ratio = self.flow_stream.ratio
        wav = self.vocoder.push(mel[:, :, ratio * (self.offset - start) :], final=final)
        samples = wav.reshape(-1).float().numpy()
        self.samples_out += samples.size
        return samples


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2").tobytes()
