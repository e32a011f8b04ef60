"""The HTML report and the static figures, without a browser: content, self-containment,
escaping, decimation, empty and running runs."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from plotly.offline import get_plotlyjs

import stabilitylab as sl
from analysis import find_knn_dips, find_spikes
from stabilitylab import plots
from stabilitylab.report import build_report, write_figures, write_report
from stabilitylab.rundir import RunWriter, write_meta

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "bench_report.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

XSS_NAME = "<script>alert(1)</script>"
XSS_PATH = "/data/</script><script>alert(2)</script>"


def plotlyjs_removed(page: str) -> str:
    """The page without its inlined plotly.js (whose own code holds tag-like strings)."""
    assert page.count(get_plotlyjs()) == 1
    return page.replace(get_plotlyjs(), "")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """6,000 steps x 8 layers: long enough for decimation, with 2 spikes and a dip."""
    return bench.write_synthetic_run(tmp_path_factory.mktemp("runs") / "single", 6000, 8)


@pytest.fixture(scope="module")
def grid_dirs(tmp_path_factory):
    """A 2 variants x 2 learning rates grid of short runs."""
    root = tmp_path_factory.mktemp("grid")
    return [bench.write_synthetic_run(
        root / f"{variant}_lr{lr}", 1500, 5, seed=i,
        config=bench.synthetic_config(patch_proj=variant, base_lr=lr))
        for i, (variant, lr) in enumerate([(v, lr) for v in ("learned", "frozen") for lr in (1e-4, 3e-4)])]


@pytest.fixture(scope="module")
def single_html(run_dir):
    return build_report([sl.load_run(run_dir)])


def test_single_run_report_shows_header_verdict_and_every_figure(single_html):
    page = single_html
    for text in ["single", "finished", "imagenet", "vit_base", "learned", "0.00015", "4096", "adamw",
                 "2 d 6 h 30 min", "kNN top-1 (queue)", "kNN top-1 (val)", "kNN dip(s)",
                 "The first layer leads", "p = ", "Lead-lag of gradient spikes"]:
        assert text in page, text
    # loss/lr/momentum, kNN, heatmap, relative lines, lag histogram
    assert page.count('class="plot"') == 5
    assert page.count("Plotly.newPlot(") == 5


def test_plotlyjs_inlined_once_and_nothing_external(single_html):
    page = single_html
    assert page.count(get_plotlyjs()) == 1
    assert not re.search(r"<script[^>]*\bsrc\s*=", page, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", page, re.I)
    rest = plotlyjs_removed(page)
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", rest, re.I)
    assert not re.search(r"url\(\s*[\"']?(https?:)?//|@import", rest, re.I)
    assert "mathjax" not in rest.lower()
    assert '"displaylogo": false' in rest or '"displaylogo":false' in rest


def test_names_and_config_values_are_escaped(grid_dirs):
    run = sl.load_run(grid_dirs[0])
    run.name = XSS_NAME
    run.config = {**run.config, "data": {"dataset": "imagenet", "path": XSS_PATH}}
    page = build_report([run, sl.load_run(grid_dirs[1])])
    rest = plotlyjs_removed(page)
    assert "<script>alert" not in rest and "</script><script>" not in rest
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in rest  # HTML text
    assert "\\u0026lt;script\\u0026gt;alert(1)" in rest  # legend text, inside plot JSON
    # only our own scripts: plotly.js, the plot config, one per plot
    assert rest.count("<script") == 2 + rest.count('class="plot"')


def test_several_runs_compare_and_form_the_figure6_grid(grid_dirs):
    runs = sl.load_runs(grid_dirs)
    page = build_report(runs)
    assert "Comparison" in page and "Runs compared" in page
    assert "Figure 6 form" in page
    rest = plotlyjs_removed(page)
    for run in runs:
        assert f"<h2>{run.name}</h2>" in rest
    # overlays: kNN queue, kNN val, first layer; then 5 per run
    assert rest.count('class="plot"') == 3 + 5 * len(runs)


def test_no_figure6_table_without_a_grid(grid_dirs):
    page = build_report(sl.load_runs(grid_dirs[:2]))  # one variant, two lrs
    assert "Comparison" in page and "Figure 6 form" not in page


def test_decimate_keeps_extremes_ends_and_requested_steps():
    rng = np.random.default_rng(0)
    series = pd.Series(rng.standard_normal(100_000), index=np.arange(100_000) * 3)
    series.iloc[77_777] = 50.0
    series.iloc[12_345] = -50.0
    keep = [3 * 4242, 3 * 99_998, 7]  # 7 is not a logged step
    shown = plots.decimate(series, 4000, keep)
    assert len(shown) <= 4000 + 4
    assert {3 * 77_777, 3 * 12_345, 0, 3 * 99_999, 3 * 4242, 3 * 99_998} <= set(shown.index)
    assert shown.index.is_monotonic_increasing
    short = series.iloc[:100]
    assert plots.decimate(short, 4000) is short


def test_figures_keep_every_spike_and_dip_step(run_dir):
    run = sl.load_run(run_dir)
    grad_norms = run.grad_norms()
    spikes = find_spikes(grad_norms)
    fig = plots.relative_grad_figure(grad_norms, layers=list(grad_norms.columns), spikes=spikes,
                                     max_points=500)
    lines = {t.name: set(t.x) for t in fig.data if t.mode == "lines"}
    assert len(spikes) and all(len(x) < 1000 for x in lines.values())
    for spike in spikes.itertuples():
        assert {spike.step, spike.peak_step} <= lines[spike.layer]
    dips = find_knn_dips(run.knn)
    fig = plots.knn_figure(run.knn, dips, max_points=100)
    queue = next(set(t.x) for t in fig.data if t.name == "queue")
    assert len(queue) < 200
    assert set(dips.loc[dips["source"] == "queue", "bottom_step"]) <= queue
    assert set(dips.loc[dips["source"] == "queue", "start_step"]) <= queue
    assert len(fig.layout.shapes) == len(dips)


def test_empty_run_report_says_so(tmp_path):
    write_meta(tmp_path / "empty", {"status": "running", "start_time": "2024-01-01T00:00:00+00:00"})
    RunWriter(tmp_path / "empty")
    page = build_report([sl.load_run(tmp_path / "empty")])
    assert "No steps logged yet (status: running)" in page
    assert 'class="plot"' not in page


def test_running_run_reports_what_exists(tmp_path):
    run_dir = tmp_path / "partial"
    write_meta(run_dir, {"status": "running"})
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"patch_proj": "frozen"}}))
    writer = RunWriter(run_dir)
    steps = np.arange(200)
    writer.append("steps", {"step": steps, "loss": 4 - steps / 100, "lr": np.full(200, 1e-3),
                            "momentum": np.full(200, 0.99),
                            "time": pd.date_range("2024-01-01", periods=200, freq="min", tz="UTC")})
    writer.flush()
    write_meta(run_dir, {"status": "running", "start_time": "2024-01-01T00:00:00+00:00"})
    page = build_report([sl.load_run(run_dir)])
    assert "running" in page and "frozen" in page
    assert "No kNN evaluations logged yet" in page and "No per-layer gradient norms logged yet" in page
    assert "3 h 19 min (to the last logged step)" in page
    assert page.count('class="plot"') == 1


def test_write_report_and_static_figures(grid_dirs, tmp_path):
    path = write_report([sl.load_run(grid_dirs[0])], tmp_path / "out" / "report.html")
    assert path.is_file() and path.stat().st_size > 1_000_000
    paths = write_figures(sl.load_runs(grid_dirs[:2]), tmp_path / "figures")
    names = {p.name for p in paths}
    assert {"knn_overlay.png", "knn_overlay.pdf"} <= names
    assert len(paths) == 2 * (2 * 2 + 1)
    for p in paths:
        assert p.is_file() and p.stat().st_size > 1000
        assert p.read_bytes()[:4] == (b"\x89PNG" if p.suffix == ".png" else b"%PDF")


def test_figure_file_names_are_safe_and_unique():
    from stabilitylab.figures import file_stems

    assert file_stems([XSS_NAME, "a b", "a b", "..", "lr=1e-3"]) == [
        "script_alert_1_script", "a_b", "a_b_2", "run", "lr=1e-3"]


def test_report_modules_do_not_import_torch():
    code = ("import sys, stabilitylab.report, stabilitylab.plots, stabilitylab.figures; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                            timeout=60)
    assert result.returncode == 0, result.stderr


def test_seed_band_figure_averages_the_seeds_of_each_setting(tmp_path):
    from stabilitylab.figures import knn_seeds_plot, setting_labels

    dirs = [bench.write_synthetic_run(tmp_path / f"{variant}_s{seed}", 5000, 3, seed=seed + 10 * i,
                                      config={**bench.synthetic_config(patch_proj=variant), "seed": seed})
            for i, variant in enumerate(["learned", "frozen"]) for seed in range(2)]
    runs = sl.load_runs(dirs)
    assert setting_labels(runs) == ["patch_proj=learned"] * 2 + ["patch_proj=frozen"] * 2
    ax = knn_seeds_plot(runs).axes[0]
    mean_line = next(line for line in ax.get_lines() if line.get_label().startswith("patch_proj=learned"))
    vals = [r.knn[r.knn["source"] == "val"].set_index("step")["top1"] * 100 for r in runs[:2]]
    expected = (vals[0] + vals[1]).dropna() / 2
    np.testing.assert_allclose(mean_line.get_ydata(), expected.to_numpy())
    assert mean_line.get_label() == "patch_proj=learned (n=2)"
    names = {p.name for p in write_figures(runs, tmp_path / "figures")}
    assert {"knn_seeds.png", "knn_seeds.pdf"} <= names


def test_seed_bands_of_different_batch_sizes_line_up_by_epoch(tmp_path):
    """A batch-512 run takes a quarter of the steps of a batch-128 run per epoch: its band
    must sit at the same epochs, not squeezed into the first quarter of the step axis."""
    from stabilitylab.figures import knn_seeds_plot, steps_per_epoch

    dirs = []
    for batch, per_epoch in [(128, 40), (512, 10)]:
        for seed in range(2):
            run_dir = tmp_path / f"b{batch}_s{seed}"
            write_meta(run_dir, {"status": "finished", "seed": seed})
            (run_dir / "config.yaml").write_text(yaml.safe_dump({"optim": {"batch_size": batch}, "seed": seed}))
            writer = RunWriter(run_dir)
            epochs = np.arange(1, 5)
            writer.append("knn", {"step": epochs * per_epoch - 1, "epoch": epochs.astype(float),
                                  "source": ["val"] * 4, "k": [20] * 4, "top1": 0.2 + 0.01 * epochs + 0.01 * seed,
                                  "n_queries": [1000] * 4})
            writer.close()
            dirs.append(run_dir)
    runs = sl.load_runs(dirs)
    assert [steps_per_epoch(r) for r in runs] == [40, 40, 10, 10]
    ax = knn_seeds_plot(runs).axes[0]  # the default when steps per epoch differ
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert ax.get_xlabel() == "epoch"
    for label in ("batch_size=128 (n=2)", "batch_size=512 (n=2)"):
        np.testing.assert_allclose(lines[label].get_xdata(), [1, 2, 3, 4])
        np.testing.assert_allclose(lines[label].get_ydata(), 100 * (0.205 + 0.01 * np.arange(1, 5)))
    by_step = knn_seeds_plot(runs, x="step").axes[0]
    assert by_step.get_xlabel() == "step" and max(by_step.get_lines()[1].get_xdata()) == 39
    assert knn_seeds_plot(runs[:2]).axes[0].get_xlabel() == "step"  # one batch size: steps
    with pytest.raises(ValueError, match="'step' or 'epoch'"):
        knn_seeds_plot(runs, x="time")


def test_seed_band_labels_can_name_chosen_keys(tmp_path):
    from stabilitylab.figures import setting_labels

    dirs = [bench.write_synthetic_run(tmp_path / f"r{i}", 200, 3, seed=i, config={
        **bench.synthetic_config(base_lr=lr, dataset=dataset), "seed": i % 2})
            for i, (lr, dataset) in enumerate([(1e-3, "a"), (1e-3, "a"), (1e-2, "b"), (1e-2, "b")])]
    runs = sl.load_runs(dirs)
    assert setting_labels(runs) == ["dataset=a, base_lr=0.001"] * 2 + ["dataset=b, base_lr=0.01"] * 2
    assert setting_labels(runs, keys=["optim.base_lr"]) == ["base_lr=0.001"] * 2 + ["base_lr=0.01"] * 2
    with pytest.raises(ValueError, match="optim.batch_sise"):
        setting_labels(runs, keys=["optim.batch_sise"])


def test_a_sweep_concatenates_into_one_frame_with_its_settings(grid_dirs):
    runs = sl.load_runs(grid_dirs)
    knn = sl.concat_runs(runs, "knn")
    assert len(knn) == sum(len(r.knn) for r in runs)
    assert list(knn.columns[:1]) == ["run"] and {"model.patch_proj", "optim.base_lr"} <= set(knn.columns)
    for run in runs:
        rows = knn[knn["run"] == run.name]
        np.testing.assert_array_equal(rows["top1"].to_numpy(), run.knn["top1"].to_numpy())
        assert set(rows["model.patch_proj"]) == {run.config["model"]["patch_proj"]}
        assert set(rows["optim.base_lr"]) == {run.config["optim"]["base_lr"]}
    mean = knn.groupby("model.patch_proj")["top1"].mean()
    assert mean["frozen"] == pytest.approx(pd.concat([r.knn["top1"] for r in runs[2:]]).mean())
