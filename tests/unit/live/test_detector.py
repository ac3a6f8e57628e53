"""Turn-taking on per-frame speech probabilities (no model): start, stop, resume, commit,
clicks, padding, the length cap, bad settings."""

from __future__ import annotations

import numpy as np
import pytest

from iomni.errors import InvalidInput
from iomni.live.detector import (
    SpeechStarted,
    SpeechStopped,
    TurnDetection,
    TurnDetector,
    Utterance,
)
from iomni.live.vad import FRAME_MS, FRAME_SAMPLES

SPEECH, SILENCE = 0.9, 0.05


def feed(detector: TurnDetector, pattern: list[tuple[float, int]]) -> list[tuple[int, object]]:
    """(probability, ms) runs; returns (stream ms when emitted, event). Frame values encode
    their index, so the committed audio says which frames it holds."""
    out = []
    for probability, ms in pattern:
        for _ in range(ms // FRAME_MS):
            index = detector.frames_seen
            frame = np.full(FRAME_SAMPLES, index, dtype=np.float32)
            for event in detector.push(frame, probability):
                out.append((detector.position_ms, event))
    return out


def kinds(events: list[tuple[int, object]]) -> list[str]:
    return [type(e).__name__ for _, e in events]


def test_speech_then_silence_starts_stops_and_commits() -> None:
    detector = TurnDetector(TurnDetection())
    events = feed(detector, [(SILENCE, 960), (SPEECH, 1600), (SILENCE, 1504)])
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Utterance"]
    (started_at, started), (stopped_at, stopped), (commit_at, utterance) = events
    assert isinstance(started, SpeechStarted) and started.audio_start_ms == 960
    assert started_at == 960 + 256  # once min_speech_ms of speech was heard
    assert isinstance(stopped, SpeechStopped) and stopped.audio_end_ms == 2560
    assert stopped_at == 2560 + 192
    assert isinstance(utterance, Utterance) and commit_at == 2560 + 512
    assert (utterance.audio_start_ms, utterance.audio_end_ms) == (960, 2560)
    frames = utterance.audio.reshape(-1, FRAME_SAMPLES)[:, 0].astype(int)
    # 300 ms of padding before the speech (10 frames at 32 ms), a short tail after it.
    assert frames[0] == 960 // FRAME_MS - 10
    assert frames[-1] == 2560 // FRAME_MS + 2
    assert not detector.speaking


def test_a_click_shorter_than_min_speech_is_ignored() -> None:
    detector = TurnDetector(TurnDetection(min_speech_ms=250))
    assert feed(detector, [(SILENCE, 640), (SPEECH, 160), (SILENCE, 2000)]) == []


def test_a_pause_shorter_than_silence_resumes_the_same_turn() -> None:
    detector = TurnDetector(TurnDetection(silence_ms=500, end_of_speech_ms=192))
    events = feed(detector, [(SPEECH, 960), (SILENCE, 320), (SPEECH, 640), (SILENCE, 640)])
    assert kinds(events) == [
        "SpeechStarted",
        "SpeechStopped",
        "SpeechStarted",
        "SpeechStopped",
        "Utterance",
    ]
    assert events[2][1].resumed  # type: ignore[attr-defined]
    utterance = events[-1][1]
    assert isinstance(utterance, Utterance)
    assert (utterance.audio_start_ms, utterance.audio_end_ms) == (0, 960 + 320 + 640)


def test_a_click_during_the_pause_does_not_delay_the_commit() -> None:
    detector = TurnDetector(TurnDetection(silence_ms=500))
    events = feed(detector, [(SPEECH, 960), (SILENCE, 224), (SPEECH, 96), (SILENCE, 640)])
    assert kinds(events) == ["SpeechStarted", "SpeechStopped", "Utterance"]
    assert events[-1][0] == 960 + 512  # the click did not restart the silence


def test_the_length_cap_commits_mid_speech() -> None:
    detector = TurnDetector(TurnDetection(max_utterance_ms=2000))
    events = feed(detector, [(SPEECH, 3200)])
    utterances = [e for _, e in events if isinstance(e, Utterance)]
    assert len(utterances) == 1 and utterances[0].forced
    assert len(utterances[0].audio) <= 2000 * 16 + FRAME_SAMPLES


def test_utterance_so_far_is_what_an_early_turn_gets() -> None:
    detector = TurnDetector(TurnDetection())
    events = feed(detector, [(SPEECH, 960), (SILENCE, 224)])
    assert kinds(events) == ["SpeechStarted", "SpeechStopped"]
    early = detector.utterance_so_far()
    committed = [e for _, e in feed(detector, [(SILENCE, 320)]) if isinstance(e, Utterance)][0]
    assert np.array_equal(early.audio, committed.audio)
    assert early.audio_end_ms == committed.audio_end_ms


def test_force_commit_ends_the_turn_now() -> None:
    detector = TurnDetector(TurnDetection())
    assert detector.force_commit() is None
    feed(detector, [(SPEECH, 640)])
    utterance = detector.force_commit()
    assert utterance is not None and utterance.forced and not detector.speaking


@pytest.mark.parametrize(
    "settings",
    [
        {"threshold": 1.5},
        {"silence_ms": 100, "end_of_speech_ms": 192},
        {"min_speech_ms": -1},
        {"max_utterance_ms": 10},
    ],
)
def test_bad_settings_are_invalid_input(settings: dict) -> None:
    with pytest.raises(InvalidInput):
        TurnDetector(TurnDetection(**settings))
