"""The `iomni` command line, run as real subprocesses against the tiny checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from iomni.model.conversation import content_hash
from iomni.model.interactive_omni import PARTS

# Same entry point as the `iomni` console script (`python -m iomni.cli.main` warns on stderr
# because `iomni.cli` already imports `iomni.cli.main`).
CLI = [sys.executable, "-c", "import sys; from iomni.cli import main; sys.exit(main())"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
TIMEOUT = 120

SESSION = {
    "version": 1,
    "messages": [
        {"role": "user", "parts": [{"type": "text", "text": "Hello"}]},
        {"role": "assistant", "parts": [{"type": "text", "text": "Hi there"}]},
    ],
}


def iomni(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=TIMEOUT
    )


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def messages(session: Path) -> list[dict]:
    raw = json.loads(session.read_text())
    assert raw["version"] == 1
    return raw["messages"]


def test_inspect_checkpoint(tiny_dir: Path) -> None:
    result = iomni("inspect-checkpoint", tiny_dir)
    assert result.returncode == 0, result.stderr
    for prefix in PARTS:
        assert prefix in result.stdout
    assert "missing keys: 0" in result.stdout.splitlines()


def test_chat_two_turns_in_one_session(tiny_dir: Path, tmp_path: Path) -> None:
    image, session = tmp_path / "img.png", tmp_path / "session.json"
    image.write_bytes(png_bytes())
    common = ("chat", "--model", tiny_dir, "--session", session, "--seed", 1)

    first = iomni(
        *common, "--image", image, "--text", "What is this?", "--max-new-tokens", 8, "--timings"
    )
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip()
    assert any("prefill=" in line for line in first.stderr.splitlines())
    user, assistant = messages(session)
    assert user == {
        "role": "user",
        "parts": [
            {"type": "image", "sha256": content_hash(image.read_bytes())},
            {"type": "text", "text": "What is this?"},
        ],
    }
    assert assistant["role"] == "assistant"
    assert [p["type"] for p in assistant["parts"]] == ["text"]
    assert assistant["parts"][0]["text"].strip() == first.stdout.strip()

    reply = tmp_path / "reply.wav"
    second = iomni(*common, "--text", "And then?", "--max-new-tokens", 6, "--out", reply)
    assert second.returncode == 0, second.stderr
    info = sf.info(str(reply))
    assert info.samplerate == 24000 and info.channels == 1
    assert info.frames > 0 and info.frames % 960 == 0  # 40 ms per speech token
    history = messages(session)
    assert len(history) == 4
    assert history[:2] == [user, assistant]
    assert history[2] == {"role": "user", "parts": [{"type": "text", "text": "And then?"}]}
    assert history[3]["parts"][0]["text"].strip() == second.stdout.strip()


BAD_INPUTS: dict[str, list[str]] = {
    "missing-image": ["--image", "{dir}/nowhere.png", "--text", "hi"],
    "corrupt-image": ["--image", "{dir}/corrupt.png", "--text", "hi"],
    "empty-audio": ["--audio", "{dir}/empty.wav", "--text", "hi"],
    "garbage-session": ["--text", "hi"],
    "negative-temperature": ["--text", "hi", "--temperature", "-1"],
}


@pytest.fixture(scope="module")
def bad_runs(
    tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[subprocess.CompletedProcess[str], bytes, Path]]:
    """Run every bad-input case at once: (result, session bytes before, session path)."""
    root = tmp_path_factory.mktemp("bad")
    (root / "corrupt.png").write_bytes(np.random.default_rng(1).bytes(4096))
    (root / "empty.wav").write_bytes(b"")
    running = {}
    for case, extra in BAD_INPUTS.items():
        session = root / f"{case}.json"
        good = json.dumps(SESSION, indent=1) + "\n"
        session.write_text("{this is not json" if case == "garbage-session" else good)
        args = [a.format(dir=root) for a in extra]
        command = [*CLI, "chat", "--model", str(tiny_dir), "--session", str(session), *args]
        process = subprocess.Popen(
            command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        running[case] = (process, session.read_bytes(), session)
    results = {}
    for case, (process, before, session) in running.items():
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
        results[case] = (result, before, session)
    return results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line(
    bad_runs: dict[str, tuple[subprocess.CompletedProcess[str], bytes, Path]], case: str
) -> None:
    result, before, session = bad_runs[case]
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert session.read_bytes() == before


def test_make_checkpoint_unknown_size(tmp_path: Path) -> None:
    result = iomni("make-checkpoint", "--size", "nope", "--out", tmp_path / "out")
    assert result.returncode == 2
    assert "invalid choice: 'nope'" in result.stderr
    assert not (tmp_path / "out").exists()
