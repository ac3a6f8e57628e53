"""Triton entry point for `llm`; the model's code lives in iomni.triton.models."""

from iomni.triton.models.llm import TritonPythonModel

__all__ = ["TritonPythonModel"]
