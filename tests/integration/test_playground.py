"""The browser playground in a real browser: Debian's Chromium driven by Playwright (never a
downloaded browser), its microphone fed a spoken question made by espeak-ng through Chromium's
fake media devices. A person's view: open the page, talk, read the reply, hear it."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from iomni.testing.speech import espeak_available, silence, spoken
from tests.integration.conftest import TENANT_KEYS, GatewayProcess

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(
    not (espeak_available() and Path(CHROMIUM).exists()), reason="needs espeak-ng and chromium"
)
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Headless, offline Chromium: no sandbox (root in CI), no calls home, fake media devices.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]


def microphone_file(path: Path) -> Path:
    """What the fake microphone plays (Chromium loops it): a question, then a long silence."""
    rate = 48000
    audio = np.concatenate(
        [silence(0.5, rate), spoken("Hello, what can you see?", rate), silence(12.0, rate)]
    )
    sf.write(path, audio, rate, subtype="PCM_16")
    return path


async def test_a_person_talks_to_the_playground_and_hears_the_reply(
    gateway: GatewayProcess, tmp_path: Path
) -> None:
    from playwright.async_api import async_playwright

    wav = microphone_file(tmp_path / "mic.wav")
    key = TENANT_KEYS["acme"]
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[*ARGS, f"--use-file-for-fake-audio-capture={wav}"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"http://127.0.0.1:{gateway.realtime_port}/#key={key}&autostart=1")
            deadline = time.monotonic() + 120
            stats: dict = {}
            while time.monotonic() < deadline:
                stats = await page.evaluate("window.iomniStats")
                if stats["responses"] >= 1 and stats["playedSamples"] > 24000:
                    break
                await page.wait_for_timeout(250)
            assert errors == []
            assert stats["responses"] >= 1, stats
            assert stats["transcript"].strip(), stats  # a reply transcript appeared
            assert stats["playedSamples"] > 24000, stats  # and over a second of it was played
            assert stats["ttfaMs"] and 0 < stats["ttfaMs"][0] < 30000
            shown = await page.inner_text("#transcript")
            assert stats["transcript"].strip()[:20] in shown
            assert "ms" in await page.inner_text("#ttfa")
            await page.screenshot(path=str(tmp_path / "playground.png"))
            if os.environ.get("IOMNI_UPDATE_DOCS"):
                shutil.copy(tmp_path / "playground.png", DOCS / "playground.png")
        finally:
            await browser.close()
