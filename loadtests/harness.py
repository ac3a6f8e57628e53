"""What every benchmark and suite in loadtests/ starts with: its command line, the generated
checkpoint it runs on, a throwaway Redis."""

from __future__ import annotations

import argparse
import subprocess
import urllib.request
from pathlib import Path

from iomni.model.generate import make_checkpoint


def parser(description: str | None) -> argparse.ArgumentParser:
    """--out (where results are written) and --checkpoints (where generated ones live)."""
    parsed = argparse.ArgumentParser(description=description)
    parsed.add_argument("--out", type=Path, default=Path("docs/benchmarks"))
    parsed.add_argument("--checkpoints", type=Path, default=Path(".cache/checkpoints"))
    return parsed


def checkpoint(args: argparse.Namespace, size: str = "small") -> Path:
    """The generated checkpoint of this size, made if missing; transformers kept quiet."""
    import transformers

    transformers.logging.set_verbosity_error()
    path = args.checkpoints / size
    if not (path / "config.json").exists():
        make_checkpoint(size, path)
    return path


def redis_command(port: int, *options: str) -> list[str]:
    """redis-server on loopback without snapshots (options add to or override that)."""
    return ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", *options]


def start_redis(port: int) -> subprocess.Popen:
    return subprocess.Popen(redis_command(port, "--appendonly", "no"), stdout=subprocess.DEVNULL)


def scrape(url: str, name: str) -> float:
    """The sum of a Prometheus series over all its labels (0 when absent)."""
    with urllib.request.urlopen(url) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith((f"{name} ", f"{name}{{"))
    )


def silence_heard(chunks: list[tuple[float, float]]) -> float:
    """Seconds of silence a client hears when it plays a reply from its first chunk on, in
    real time: `chunks` are (arrival time, audio seconds) in order. A chunk that arrives
    after the audio before it has played out leaves a hole of the difference."""
    if not chunks:
        return 0.0
    played_until, silence = chunks[0][0], 0.0
    for arrived, seconds in chunks:
        if arrived > played_until:
            silence += arrived - played_until
            played_until = arrived
        played_until += seconds
    return silence


def publish(out: Path, name: str, lines: list[str]) -> None:
    """Write a result page (docs/benchmarks/NAME.md) and show it."""
    text = "\n".join(lines)
    (out / f"{name}.md").write_text(text + "\n")
    print(text)
