"""Triton entry point for `audio_encoder`; the model's code lives in iomni.triton.models."""

from iomni.triton.models.audio_encoder import TritonPythonModel

__all__ = ["TritonPythonModel"]
