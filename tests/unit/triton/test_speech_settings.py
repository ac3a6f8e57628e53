"""Where the speech decoder's latency settings come from: its model parameters, else the
environment the Helm chart sets; a bad value stops the model from loading with its name."""

from __future__ import annotations

import pytest

from iomni.errors import InvalidInput
from iomni.model.speech.stream import SpeechSettings
from iomni.triton.models.speech_decoder import batch_limit, speech_settings


def test_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("IOMNI_SPEECH_FIRST_CHUNK_TOKENS", raising=False)
    monkeypatch.delenv("IOMNI_SPEECH_FLOW_STEPS", raising=False)
    assert speech_settings({"first_chunk_tokens": "", "flow_steps": ""}) == SpeechSettings()


def test_model_parameters_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOMNI_SPEECH_FIRST_CHUNK_TOKENS", "12")
    monkeypatch.setenv("IOMNI_SPEECH_FLOW_STEPS", "5")
    assert speech_settings({"first_chunk_tokens": "8"}) == SpeechSettings(
        first_chunk_tokens=8, flow_steps=5
    )


@pytest.mark.parametrize(
    "params, message",
    [
        ({"first_chunk_tokens": "ten"}, "first_chunk_tokens .* must be an integer, not 'ten'"),
        ({"flow_steps": "99"}, "flow_steps must be 0 .* not 99"),
    ],
)
def test_bad_values_are_named(params: dict[str, str], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        speech_settings(params)


def test_batch_limit_defaults_to_8_and_refuses_what_would_stall_the_decoder() -> None:
    assert batch_limit({"batch_limit": ""}) == 8
    assert batch_limit({"batch_limit": "3"}) == 3
    for bad in ("0", "-1", "eight"):  # 0 would take nothing and wait forever
        with pytest.raises(InvalidInput, match=f"batch_limit must be .* not '{bad}'"):
            batch_limit({"batch_limit": bad})
