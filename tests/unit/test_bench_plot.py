"""`scalellm bench plot`: result files compared in one PNG (needs matplotlib, the [bench] extra)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.serving import report
from bench.serving.cli import main as bench
from bench.serving.metrics import RequestResult, compute_metrics
from bench.serving.runner import RunResult

pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install 'scalellm[bench]')")


def fake_run(limit: int, speed: float) -> RunResult:
    results = [
        RequestResult(
            ok=True,
            prompt_len=8,
            prompt_tokens=8,
            output_tokens=16,
            chunks=16,
            ttft_s=0.01 * limit / speed,
            latency_s=0.2 * limit / speed,
            itl_s=[0.01] * 15,
            started_s=0.0,
        )
        for _ in range(limit)
    ]
    return RunResult(limit, compute_metrics(results, 0.2 * limit / speed), None, results)


def write(path: Path, label: str | None, limits: list[int], speed: float) -> Path:
    report.save_result(path, report.build_result({"label": label}, [fake_run(c, speed) for c in limits]))
    return path


def test_plot_compares_result_files_in_a_png(tmp_path: Path) -> None:
    ours = write(tmp_path / "ours.json", "ours", [1, 4, 16, 64], speed=2.0)
    theirs = write(tmp_path / "theirs.json", None, [1, 4, 16], speed=1.0)
    single = write(tmp_path / "single.json", "one run", [8], speed=1.5)
    out = tmp_path / "plots" / "compare.png"
    assert bench(["plot", str(ours), str(theirs), str(single), "-o", str(out), "--title", "test"]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_labels_must_match_the_files_and_files_must_be_results(tmp_path: Path) -> None:
    ours = write(tmp_path / "a.json", None, [1, 2], speed=1.0)
    with pytest.raises(SystemExit, match="2 labels for 1 result files"):
        bench(["plot", str(ours), "-o", str(tmp_path / "x.png"), "--labels", "a,b"])
    other = tmp_path / "other.json"
    other.write_text('{"completed": 3}')
    with pytest.raises(SystemExit, match="not a scalellm bench result"):
        bench(["plot", str(other), "-o", str(tmp_path / "y.png")])
