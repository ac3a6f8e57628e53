"""The embedded runtime the live session tests run on (tiny model, in-memory state)."""

from __future__ import annotations

from pathlib import Path

import pytest

from iomni.runtime.build import Runtime, build_runner
from iomni.runtime.settings import Settings


@pytest.fixture
async def runtime(tiny_dir: Path):  # type: ignore[no-untyped-def]
    settings = Settings(model=tiny_dir, transport="inprocess", redis_url="memory")
    built: Runtime = build_runner(settings, role="test")
    yield built
    await built.close()
