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
    "heap": [sys.executable, str(BENCH / "bench_heap.py"), "--quick"],
    "denormal": [sys.executable, str(BENCH / "bench_denormal.py"), "--quick"],
    "precision": [sys.executable, str(BENCH / "bench_precision.py"), "--quick"],
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
    rc = proc.wait(timeout=600)  # nine scripts at once on a loaded 2-core machine
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
    assert len(table) >= 9 and all(line.endswith(" |") for line in table)
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
    measured, goal, status = one(rows, "6 ours / reference")
    assert 0.1 < number(measured) < 20 and goal == ">= 1.3" and status == "info"
    rows = results((runs[1] / "pipeline.log").read_text())
    for pipeline in ("device", "workers"):  # on generated JPEGs of mixed sizes: streamed, decoded per batch
        measured, goal, _ = one(rows, f"6 end to end / fixed batch (cpu, tiny, b32, {pipeline} pipeline")
        assert 0 < number(measured) < 5 and goal == ">= 0.9"
        assert number(one(rows, f"6 pipeline alone (cpu, {pipeline},")[0]) > 0


def test_reference_step_does_the_same_maths_as_ours():
    """The benchmark's official-style step (benchmarks/reference_step.py) on the same weights:
    the same loss, gradients and momentum encoder as stabilitylab's fused step (fp32; the
    large class-token gradient sums differently over one fused batch and two, hence rtol 1e-4)."""
    sys.path.insert(0, str(BENCH))
    from reference_step import OfficialStyleMoCo

    from trainer.config import ModelConfig, TrainConfig, resolve
    from trainer.moco import MoCo

    torch = pytest.importorskip("torch")
    cfg = resolve(TrainConfig(model=ModelConfig(img_size=16, patch_size=4, embed_dim=32, depth=2,
                                                num_heads=2, head_hidden_dim=64, head_out_dim=16)))
    torch.manual_seed(0)
    ours = MoCo(cfg.model, cfg.moco).train()
    theirs = OfficialStyleMoCo.from_moco(ours).train()
    x1, x2 = torch.randn(8, 3, 16, 16), torch.randn(8, 3, 16, 16)
    loss, _ = ours(x1, x2, 0.9)
    reference = theirs(x1, x2, 0.9)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    loss.backward()
    reference.backward()
    base = [*ours.backbone.parameters(), *ours.projector.parameters()]
    for a, b in zip(base, theirs.base_encoder.parameters(), strict=True):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    for a, b in zip(ours.predictor.parameters(), theirs.predictor.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6)
    momentum = [*ours.momentum_backbone.parameters(), *ours.momentum_projector.parameters()]
    for a, b in zip(momentum, theirs.momentum_encoder.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


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


def test_bench_heap_quick(runs):
    text = finished(runs, "heap")
    measured, _, status = one(results(text), "6 keep_heap: step time off / on (cpu time)")
    assert 0.2 < number(measured) < 5 and status == "info"
    faults = {arm: float(n) for arm, n in re.findall(r"keep_heap=(on|off) .* (\d+) page faults a step", text)}
    assert faults["on"] < faults["off"] / 2, faults  # the setting reached the child (4-100x fewer)


def test_bench_denormal_quick(runs):
    text = finished(runs, "denormal")
    measured, _, status = one(results(text), "6 flush_denormal: step time off / on (cpu time)")
    assert 0.2 < number(measured) < 20 and status == "info"
    # the planted saturation makes subnormal gradients, in the attention's backward pass, and
    # the setting really flushes them (a census of every op's output, not a timing)
    off, on = (int(n.replace(",", "")) for n in re.search(
        r"subnormal floats computed in one step: ([\d,]+) with flush_denormal=off, ([\d,]+) with it on", text).groups())
    assert off > 1000 and on == 0, (off, on)
    origin = re.search(r"arise in: (\w+)", text).group(1)
    assert "attention" in origin and origin.endswith("_backward"), origin


def test_bench_detectors_quick(runs):
    text = finished(runs, "detectors")
    rows = results(text)
    assert one(rows, "8 default rule: >=10x values missed")[0].startswith("0 of ")
    assert one(rows, "8 default rule: events under 3x")[0] == "0"
    recall = one(rows, "8 default rule: recall of planted")[0].split(" / ")
    assert len(recall) == 5 and number(recall[0]) >= 90  # 30x spikes
    assert "default rule (analysis.DEFAULT_RULE): mad:6+ratio:3|ratio:10" in text
    assert "| `mad:6` |" in text and "### Committed runs (4 under data_samples/runs)" in text


def test_bench_precision_quick(runs):
    text = finished(runs, "precision")
    rows = results(text)
    for precision in ("bf16", "fp16"):
        measured, _, status = one(rows, f"6 precision: step time {precision} / fp32 (cpu time)")
        assert 0.1 < number(measured) < 50 and status == "info"
    assert re.search(r"native bf16: (yes|no)", text)
