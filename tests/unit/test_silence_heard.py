"""The benchmark's playback figure: silence a real-time player hears, from chunk arrivals."""

from __future__ import annotations

import pytest
from loadtests.harness import silence_heard


def test_chunks_ahead_of_playback_leave_no_silence() -> None:
    # 1 s chunks arriving every 0.5 s, then one 1.4 s gap: the buffer built up covers it.
    assert silence_heard([(0.0, 1.0), (0.5, 1.0), (1.0, 1.0), (2.4, 1.0)]) == 0.0


def test_a_late_chunk_leaves_a_hole_and_playback_resumes_from_it() -> None:
    # Played out at 2.0; the third chunk comes at 2.5 (0.5 s hole), the fourth at 4.0
    # (its predecessor ends at 3.5: another 0.5 s).
    heard = silence_heard([(0.0, 1.0), (0.5, 1.0), (2.5, 1.0), (4.0, 1.0)])
    assert heard == pytest.approx(1.0)


def test_no_audio_no_silence() -> None:
    assert silence_heard([]) == 0.0
