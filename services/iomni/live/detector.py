"""Turn-taking on a live stream, from per-frame speech probabilities: when the user starts
talking, stops, and when their turn is over. Pure state: frames in, events out, no I/O.

    idle ──speech ≥ min_speech_ms──► speaking ──silence ≥ end_of_speech_ms──► stopped
      ▲                                 ▲                                        │
      │                                 └────── speech ≥ min_speech_ms ──────────┤ (resumed)
      └──────────────── silence ≥ silence_ms: the turn is committed ◄───────────┘

Offsets are milliseconds of stream audio (16 kHz samples received), not wall-clock time. The
committed utterance keeps `prefix_padding_ms` before the speech and a short tail after it; the
silence that ended the turn is not part of it. An utterance that reaches `max_utterance_ms` is
committed where it stands (the audio encoder takes 30 s windows).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from iomni.errors import InvalidInput
from iomni.live.vad import FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE

TAIL_MS = 96  # audio kept after the end of speech (a word's release)
HYSTERESIS = 0.15  # below threshold - this is silence; between, the state holds
# Speech is counted across dips (a plosive, a breath): a candidate ends only after this much
# silence, so min_speech_ms is speech heard within one burst of sound, not one unbroken run.
CANDIDATE_GAP_MS = 128


@dataclass(frozen=True)
class TurnDetection:
    threshold: float = 0.5  # speech probability that counts as speech
    min_speech_ms: int = 250  # shorter bursts (a click, a cough) are not speech
    end_of_speech_ms: int = 192  # silence that marks the end of speech (a turn may start early)
    silence_ms: int = 500  # silence that ends the turn (it is committed)
    prefix_padding_ms: int = 300  # audio kept before the detected start
    max_utterance_ms: int = 30_000

    def validate(self) -> TurnDetection:
        if not 0.0 < self.threshold < 1.0:
            raise InvalidInput(f"threshold must be between 0 and 1, got {self.threshold}")
        for name in ("min_speech_ms", "end_of_speech_ms", "silence_ms", "prefix_padding_ms"):
            value = getattr(self, name)
            if not 0 <= value <= 10_000:
                raise InvalidInput(f"{name} must be between 0 and 10000 ms, got {value}")
        if self.end_of_speech_ms > self.silence_ms:
            raise InvalidInput(
                f"end_of_speech_ms ({self.end_of_speech_ms}) cannot exceed silence_ms "
                f"({self.silence_ms}): speech ends before the turn does"
            )
        if not 1_000 <= self.max_utterance_ms <= 300_000:
            raise InvalidInput("max_utterance_ms must be between 1000 and 300000")
        return self


@dataclass(frozen=True)
class SpeechStarted:
    audio_start_ms: int
    resumed: bool = False  # speech came back before the turn was committed


@dataclass(frozen=True)
class SpeechStopped:
    audio_end_ms: int


@dataclass(frozen=True)
class Utterance:
    """A committed user turn's audio (16 kHz float32) and where it lies in the stream."""

    audio: np.ndarray
    audio_start_ms: int
    audio_end_ms: int
    forced: bool = False  # committed at max_utterance_ms, not by silence


DetectorEvent = SpeechStarted | SpeechStopped | Utterance


def _ms(frames: int) -> int:
    return frames * FRAME_MS


class TurnDetector:
    def __init__(self, detection: TurnDetection) -> None:
        self.detection = detection.validate()
        self.frames_seen = 0  # stream position, in frames
        pad = -(-detection.prefix_padding_ms // FRAME_MS) + -(-detection.min_speech_ms // FRAME_MS)
        self._recent: deque[np.ndarray] = deque(maxlen=max(pad, 1))  # idle: padding + candidate
        self._speech_run = 0  # speech frames in the current burst of sound (see CANDIDATE_GAP_MS)
        self._burst_start = 0  # first frame of that burst
        self._gap = 0  # silent frames since the burst's last speech frame
        self._silence_run = 0  # consecutive silent frames
        self._utterance: list[np.ndarray] = []
        self._start_frame = 0  # first frame of detected speech
        self._end_frame = 0  # first frame of the silence that stopped it
        self.speaking = False  # in an utterance (speaking or stopped, not yet committed)
        self.stopped = False

    @property
    def position_ms(self) -> int:
        return _ms(self.frames_seen)

    def utterance_so_far(self) -> Utterance:
        """The utterance up to the end of speech (for a turn started before the commit)."""
        return self._cut(self._end_frame if self.stopped else self.frames_seen)

    def push(self, frame: np.ndarray, probability: float) -> list[DetectorEvent]:
        assert frame.shape == (FRAME_SAMPLES,)
        self.frames_seen += 1
        d = self.detection
        is_speech = probability >= d.threshold
        is_silence = probability < d.threshold - HYSTERESIS
        self._silence_run = self._silence_run + 1 if is_silence else 0
        self._count_burst(is_speech, is_silence)
        if not self.speaking:
            return self._idle(frame)
        self._utterance.append(frame)
        return self._speaking()

    def _count_burst(self, is_speech: bool, is_silence: bool) -> None:
        if is_speech:
            if self._speech_run == 0:
                self._burst_start = self.frames_seen - 1
            self._speech_run += 1
            self._gap = 0
        elif self._speech_run:
            self._gap = self._gap + 1 if is_silence else 0
            if _ms(self._gap) >= CANDIDATE_GAP_MS:
                self._speech_run = self._gap = 0

    def _heard_speech(self) -> bool:
        return self._speech_run > 0 and _ms(self._speech_run) >= self.detection.min_speech_ms

    def _idle(self, frame: np.ndarray) -> list[DetectorEvent]:
        self._recent.append(frame)
        if not self._heard_speech():
            return []
        self.speaking, self.stopped = True, False
        self._start_frame = self._burst_start
        padding = -(-self.detection.prefix_padding_ms // FRAME_MS)
        keep = min(len(self._recent), self.frames_seen - self._burst_start + padding)
        self._utterance = list(self._recent)[-keep:]
        self._utterance_first = self.frames_seen - keep
        self._recent.clear()
        return [SpeechStarted(_ms(self._start_frame))]

    def _speaking(self) -> list[DetectorEvent]:
        d = self.detection
        events: list[DetectorEvent] = []
        if self.stopped and self._heard_speech() and self._burst_start >= self._end_frame:
            self.stopped = False
            events.append(SpeechStarted(_ms(self._burst_start), resumed=True))
        if not self.stopped and _ms(self._silence_run) >= d.end_of_speech_ms:
            self.stopped = True
            self._end_frame = self.frames_seen - self._silence_run
            events.append(SpeechStopped(_ms(self._end_frame)))
        # Once stopped, a click shorter than min_speech_ms does not restart the silence; while a
        # sound goes on, though, it may still turn out to be speech resuming: wait for it.
        silent_ms = _ms(self.frames_seen - self._end_frame)
        if self.stopped and self._silence_run and silent_ms >= d.silence_ms:
            events.append(self._commit(self._end_frame, forced=False))
        elif _ms(self.frames_seen - self._utterance_first) >= d.max_utterance_ms:
            events.append(self._commit(self.frames_seen, forced=True))
        return events

    def _cut(self, end_frame: int, forced: bool = False) -> Utterance:
        tail = 0 if forced else -(-TAIL_MS // FRAME_MS)
        last = min(end_frame + tail, self.frames_seen) - self._utterance_first
        audio = np.concatenate(self._utterance[:last]) if last > 0 else np.zeros(0, np.float32)
        return Utterance(audio, _ms(self._start_frame), _ms(end_frame), forced)

    def _commit(self, end_frame: int, forced: bool) -> Utterance:
        utterance = self._cut(end_frame, forced)
        self.speaking = self.stopped = False
        self._utterance = []
        self._speech_run = self._gap = 0
        return utterance

    def force_commit(self) -> Utterance | None:
        """The client ends the turn itself (manual commit): whatever was said so far."""
        if not self.speaking:
            return None
        return self._commit(self._end_frame if self.stopped else self.frames_seen, forced=True)


def frames_of(samples: np.ndarray) -> int:
    return len(samples) // FRAME_SAMPLES


__all__ = [
    "SAMPLE_RATE",
    "SpeechStarted",
    "SpeechStopped",
    "TurnDetection",
    "TurnDetector",
    "Utterance",
]
