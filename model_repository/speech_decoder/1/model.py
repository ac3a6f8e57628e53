"""Triton entry point for `speech_decoder`; the model's code lives in iomni.triton.models."""

from iomni.triton.models.speech_decoder import TritonPythonModel

__all__ = ["TritonPythonModel"]
