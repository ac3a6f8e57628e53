"""Model repository profiles: `cpu` (the files in model_repository/) and `gpu`.

The GPU profile runs every instance on `KIND_GPU`; the encoders become TensorRT plans
(`platform: "tensorrt_plan"`, built by `make engines` from our ONNX exports) and the LLM and
speech decoder stay python-backend models running PyTorch on CUDA.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from iomni.errors import InvalidInput
from iomni.triton.tensors import AUDIO_ENCODER, MODELS, VISION_ENCODER

PROFILES = ("cpu", "gpu")
TENSORRT_MODELS = (VISION_ENCODER, AUDIO_ENCODER)
PLAN_NOTE = """Put model.plan here: `make engines` exports ONNX and builds it with trtexec inside
NVIDIA's Triton container (see services/iomni/triton/engines/README.md).
"""


def render(source: Path, out: Path, profile: str) -> list[Path]:
    """Write the repository for `profile` to `out`; returns the config files written."""
    if profile not in PROFILES:
        raise InvalidInput(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    written = []
    for model in MODELS:
        config = (source / model / "config.pbtxt").read_text()
        target = out / model
        version = target / "1"
        version.mkdir(parents=True, exist_ok=True)
        if profile == "gpu":
            config = config.replace("KIND_CPU", "KIND_GPU")
            if model in TENSORRT_MODELS:
                config = tensorrt_config(config)
                (version / "README.md").write_text(PLAN_NOTE)
            else:
                shutil.copy2(source / model / "1" / "model.py", version / "model.py")
        else:
            shutil.copy2(source / model / "1" / "model.py", version / "model.py")
        (target / "config.pbtxt").write_text(config)
        written.append(target / "config.pbtxt")
    return written


def tensorrt_config(config: str) -> str:
    """python backend -> TensorRT plan: same name, tensors and batching; no python parameters."""
    config = config.replace('backend: "python"', 'platform: "tensorrt_plan"')
    config = re.sub(r"^parameters: .*\n", "", config, flags=re.MULTILINE)
    config = re.sub(r"^# (Empty: the checkpoint|nice:).*\n", "", config, flags=re.MULTILINE)
    return config
