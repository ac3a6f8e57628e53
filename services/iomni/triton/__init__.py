"""NVIDIA Triton: the model repository's python-backend models, the server launcher and the
transport that implements the engine's `ModelParts` over tritonclient gRPC."""
