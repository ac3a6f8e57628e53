"""Triton entry point for `vision_encoder`; the model's code lives in iomni.triton.models."""

from iomni.triton.models.vision_encoder import TritonPythonModel

__all__ = ["TritonPythonModel"]
