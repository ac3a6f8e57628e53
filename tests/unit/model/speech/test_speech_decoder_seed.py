"""The Triton speech decoder reads a reply's `seed` and voice with its first request: a
seed it cannot use fails that request as the client's invalid input (INVALID_ARG), not as
INTERNAL when the reply's session opens on the render thread."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from iomni.errors import InvalidInput
from iomni.triton.models import speech_decoder
from iomni.triton.models.speech_decoder import TritonPythonModel, request_seed
from iomni.triton.tensors import END, HIDDEN, START, TEXT_TOKEN_IDS


class FakeRequest:
    """A reply's first request as the python backend hands it over: one token, one row."""

    def __init__(self, parameters: dict[str, Any]) -> None:
        self._parameters = json.dumps(parameters)
        self.inputs = {
            TEXT_TOKEN_IDS: np.array([[11]], np.int64),
            HIDDEN: np.zeros((1, 1, 4), np.float32),
            START: np.array([[True]]),
            END: np.array([[False]]),
        }

    def parameters(self) -> str:
        return self._parameters

    def get_response_sender(self) -> object:
        return object()


@pytest.fixture
def model(monkeypatch: pytest.MonkeyPatch) -> TritonPythonModel:
    """The model without Triton: inputs come from `FakeRequest.inputs`, and a session opened
    is the seed it was opened with."""

    def input_array(request: FakeRequest, name: str, optional: bool = False) -> Any:
        return request.inputs.get(name)

    monkeypatch.setattr(speech_decoder, "input_array", input_array)
    opened = SimpleNamespace(of_model=lambda model, speaker, seed, settings: seed)
    monkeypatch.setattr(speech_decoder, "SpeechSession", opened)
    model = TritonPythonModel()
    model.model, model.settings = None, None  # type: ignore[assignment]
    return model


@pytest.mark.parametrize("seed", ["three", None, 1.5e30, 2**64])
def test_a_seed_it_cannot_use_is_the_clients_invalid_input(
    model: TritonPythonModel, seed: Any
) -> None:
    request = model._speech_request(FakeRequest({"seed": seed}))
    assert isinstance(request.invalid, InvalidInput)
    assert f"seed must be an integer from {-(2**63)} to {2**64 - 2}, not {seed!r}" in str(
        request.invalid
    )
    assert request.open is None  # failed in its turn, before any session opens


@pytest.mark.parametrize(("parameters", "seed"), [({}, 0), ({"seed": 7}, 7), ({"seed": "7"}, 7)])
def test_a_usable_seed_opens_the_reply(
    model: TritonPythonModel, parameters: dict[str, Any], seed: int
) -> None:
    request = model._speech_request(FakeRequest(parameters))
    assert request.invalid is None and request.open is not None
    assert request.open() == seed


def test_the_seed_range_is_what_torch_seeds_with_seed_and_seed_plus_one() -> None:
    for seed in (-(2**63), 2**64 - 2):
        torch.Generator().manual_seed(request_seed({"seed": seed}))
        torch.Generator().manual_seed(request_seed({"seed": seed}) + 1)


class RecordingEncoder:
    def __init__(self) -> None:
        self.embedded: list[bytes] = []

    def embed(self, reference: bytes) -> torch.Tensor:
        if reference == b"not audio":
            raise InvalidInput("speaker_wav is not audio this server can decode")
        self.embedded.append(reference)
        return torch.ones(192)


def test_a_cloned_voice_is_embedded_as_its_request_arrives(model: TritonPythonModel) -> None:
    """Not when the reply opens on the render thread, where it held every other reply's audio;
    a reference that does not decode fails its request as invalid input."""
    encoder = RecordingEncoder()
    model._speaker = encoder  # type: ignore[assignment]
    request = FakeRequest({})
    request.inputs[speech_decoder.SPEAKER_WAV] = np.array([b"RIFF..."], dtype=np.object_)
    speech = model._speech_request(request)
    assert encoder.embedded == [b"RIFF..."]  # at intake
    assert speech.open is not None
    speech.open()
    assert encoder.embedded == [b"RIFF..."]  # not again on the render thread
    request.inputs[speech_decoder.SPEAKER_WAV] = np.array([b"not audio"], dtype=np.object_)
    assert isinstance(model._speech_request(request).invalid, InvalidInput)
