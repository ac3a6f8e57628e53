"""A benchmark's scratch directory goes when the run ends well and stays when it fails."""

from __future__ import annotations

from pathlib import Path

import pytest
from loadtests import harness


def test_removed_after_a_run_that_ends_well() -> None:
    with harness.work_dir("iomni-test-") as work:
        (work / "gateway.log").write_text("gateway ready\n")
    assert not work.exists()


@pytest.mark.parametrize("failure", [RuntimeError("triton did not start"), SystemExit(1)])
def test_kept_and_named_when_the_run_fails(
    failure: BaseException, capsys: pytest.CaptureFixture[str]
) -> None:
    kept: Path | None = None
    with pytest.raises(type(failure)), harness.work_dir("iomni-test-") as work:
        kept = work
        (work / "gateway.log").write_text("boom\n")
        raise failure
    assert kept is not None and (kept / "gateway.log").read_text() == "boom\n"
    assert str(kept) in capsys.readouterr().err
    (kept / "gateway.log").unlink()
    kept.rmdir()
