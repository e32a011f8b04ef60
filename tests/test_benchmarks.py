"""Smoke tests of the benchmark scripts: each runs with --quick in a subprocess, exits 0 and
prints its figure lines (`RESULT | figure | measured | goal | status`).

The subprocesses all start together in a module fixture, so the module costs about as long as
the slowest one rather than their sum. bench_overhead.py and bench_throughput.py are run by
`gpu_check.sh --dry-run` (their --quick mode on the CPU, with pyarrow, omegaconf, plotly,
matplotlib, scikit-learn and faiss unimportable, as on a bare GPU machine);
bench_knn.py also runs on its own, with faiss and scikit-learn, to check the backends agree.
"""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
pytestmark = pytest.mark.slow

COMMANDS = {
    "gpu_check": ["bash", str(BENCH / "gpu_check.sh"), "--dry-run"],
    "knn": [sys.executable, str(BENCH / "bench_knn.py"), "--quick"],
    "writer": [sys.executable, str(BENCH / "bench_writer.py"), "--quick"],
    "analysis": [sys.executable, str(BENCH / "bench_analysis.py"), "--quick"],
    "monitor": [sys.executable, str(BENCH / "bench_monitor.py"), "--quick"],
    "detectors": [sys.executable, str(BENCH / "bench_detectors.py"), "--quick"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """name -> (Popen, output file); gpu_check's per-part logs land in logs/."""
    tmp = tmp_path_factory.mktemp("bench")
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_LOGS=str(tmp / "logs"))
    started = {}
    for name, command in COMMANDS.items():
        out = tmp / f"{name}.out"
        with out.open("w") as handle:
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT)
        started[name] = (proc, out)
    yield started, tmp / "logs"
    for proc, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def finished(runs, name) -> str:
    (started, _) = runs
    proc, out = started[name]
    rc = proc.wait(timeout=300)
    text = out.read_text()
    assert rc == 0, f"{' '.join(COMMANDS[name])} exited {rc}:\n{text[-3000:]}"
    return text


def results(text: str) -> dict[str, list[str]]:
    """figure -> [measured, goal, status] of every RESULT line."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("RESULT |"):
            figure, *rest = [cell.strip() for cell in line.split("|")[1:]]
            rows[figure] = rest
    return rows


def one(rows: dict, prefix: str) -> list[str]:
    found = [v for k, v in rows.items() if k.startswith(prefix)]
    assert len(found) == 1, f"expected one RESULT line starting {prefix!r}, got {list(rows)}"
    return found[0]


def number(text: str) -> float:
    return float(re.search(r"[\d,]*\.?\d+", text).group().replace(",", ""))


def test_gpu_check_dry_run_needs_no_pyarrow_omegaconf_plotly_sklearn(runs):
    text = finished(runs, "gpu_check")
    assert "unimportable" in text
    assert "| figure | measured | goal | status |" in text
    table = [line for line in text.splitlines() if line.startswith("| ") and "figure" not in line]
    assert len(table) >= 5 and all(line.endswith(" |") for line in table)
    assert "FAILED" not in text
    knn_log = (runs[1] / "knn.log").read_text()
    assert re.search(r"faiss\s+not installed", knn_log) and re.search(r"sklearn\s+not installed", knn_log)


def test_bench_overhead_quick(runs):
    finished(runs, "gpu_check")
    text = (runs[1] / "overhead.log").read_text()
    rows = results(text)
    measured, goal, status = one(rows, "1 overhead ratio every default-on instrument / off")
    assert 0.2 < number(measured) < 5 and goal == "<= 1.03" and status == "info"
    assert 0.2 < number(one(rows, "1 overhead ratio gradient probe + kNN enqueue / off")[0]) < 5
    for probe in ("grad+optim", "grad+attention@1", "grad+detector", "grad+keep"):
        assert 0.2 < number(one(rows, f"1 probe cost {probe} / grad")[0]) < 5


def test_bench_throughput_quick(runs):
    finished(runs, "gpu_check")
    rows = results((runs[1] / "throughput.log").read_text())
    measured, _, _ = one(rows, "6 throughput, fixed batch")
    assert number(measured) > 0


def test_bench_knn_quick(runs):
    rows = results(finished(runs, "knn"))
    assert number(one(rows, "2 queue kNN evaluation")[0]) > 0
    share, goal, _ = one(rows, "2 queue kNN share of training")
    assert 0 < number(share) < 100 and goal == "<= 2%"
    measured, _, status = one(rows, "2 kNN backends")
    assert status == "met", measured  # faiss / scikit-learn predict what the torch backend does
    assert "not installed" not in measured


def test_bench_writer_quick(runs):
    rows = results(finished(runs, "writer"))
    for kind in ("noise", "walk"):
        assert number(one(rows, f"5 writer rows/s, {kind}")[0]) > 0
        assert 4 < number(one(rows, f"5 layers bytes/row, {kind}")[0]) < 40


def test_bench_analysis_quick(runs):
    rows = results(finished(runs, "analysis"))
    for n in (15, 150):
        measured, _, _ = one(rows, f"3 analysis 10000 steps x {n} ")
        assert number(measured) > 0 and "GB" in measured


def test_bench_monitor_quick(runs):
    text = finished(runs, "monitor")
    measured, goal, status = one(results(text), "7 Monitor overhead on/off")
    assert 0.2 < number(measured) < 5 and goal == "<= 1.03" and status == "info"
    assert "ratio on/off median" in text


def test_bench_detectors_quick(runs):
    text = finished(runs, "detectors")
    rows = results(text)
    assert one(rows, "8 default rule: >=10x values missed")[0].startswith("0 of ")
    assert one(rows, "8 default rule: events under 3x")[0] == "0"
    recall = one(rows, "8 default rule: recall of planted")[0].split(" / ")
    assert len(recall) == 5 and number(recall[0]) >= 90  # 30x spikes
    assert "default rule (analysis.DEFAULT_RULE): mad:6+ratio:3|ratio:10" in text
    assert "| `mad:6` |" in text and "### Committed runs (4 under data_samples/runs)" in text
