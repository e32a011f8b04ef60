"""The HTML report and the static figures, without a browser: content, self-containment,
escaping, decimation, empty and running runs, the verdict block, bands, grouping by setting."""
import base64
import gzip
import html
import importlib.util
import json
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
from analysis import compare_runs, find_knn_dips, find_spikes, format_summary, seed_spread, summarize_run
from analysis.summary import verdict_text
from stabilitylab import plots
from stabilitylab.report import build_report, plotly_gz, write_figures, write_report
from stabilitylab.rundir import RunWriter, write_meta

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "bench_report.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

SAMPLES = ROOT / "data_samples" / "runs"
SINGLE = SAMPLES / "findings" / "batch512_long_lr1e-1" / "batch_size=512_seed0"
XSS_NAME = "<script>alert(1)</script>"
XSS_PATH = "/data/</script><script>alert(2)</script>"
XSS_LAYER = "<img src=x onerror=alert(3)>"


def plotlyjs_removed(page: str) -> str:
    """The page without its inlined, compressed plotly.js."""
    assert page.count(plotly_gz()) == 1
    return page.replace(plotly_gz(), "")


def plot_specs(page: str) -> list[dict]:
    """The plotly figure of every plot of a page, parsed from its JSON block."""
    blocks = re.findall(r'<script type="application/json" data-plot="(plot-\d+)">(.*?)</script>', page, re.S)
    assert len(blocks) == page.count('class="plot"')
    return [json.loads(spec) for _, spec in blocks]


def page_text(page: str) -> str:
    """The text a reader sees: tags and <wbr> dropped, entities decoded, spaces collapsed."""
    body = re.sub(r"<script.*?</script>", " ", page, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<wbr>", "", re.sub(r"<(?!wbr)[^>]+>", " ", body))))


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
                 "patch_embed spikes lead blocks.4 spikes", "association p = ", "Lead-lag of gradient spikes",
                 "Largest excursions", "Spike rule", "mad:6+ratio:3|ratio:10"]:
        assert text in page, text
    # loss/lr/momentum, kNN, heatmap, relative lines, lag histogram
    assert page.count('class="plot"') == 5 and len(plot_specs(page)) == 5
    assert "<title>single</title>" in page and "<h1>single</h1>" in page  # a short title


def test_plotlyjs_inlined_once_compressed_and_nothing_external(single_html):
    page = single_html
    packed = re.search(r'<script type="application/gzip;base64" id="plotly-gz">([^<]*)</script>', page).group(1)
    assert gzip.decompress(base64.b64decode(packed)).decode() == get_plotlyjs()  # the installed plotly.js
    assert len(packed) < 0.45 * len(get_plotlyjs())
    assert "DecompressionStream" in page and "Plotly.newPlot" in page
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
    # only our own scripts: plotly.js, the plot config, the loader, one JSON block per plot
    assert rest.count("<script") == 3 + rest.count('class="plot"')


def hostile_layer_run(path: Path) -> Path:
    """A short run whose one later layer has a hostile name and spikes after the first."""
    write_meta(path, {"status": "finished"})
    writer = RunWriter(path)
    rng = np.random.default_rng(0)
    steps = np.arange(400)
    first, later = np.exp(0.1 * rng.standard_normal(400)), np.exp(0.1 * rng.standard_normal(400))
    first[[150, 300]] *= 40
    later[[152, 302]] *= 40
    writer.append("steps", {"step": steps, "loss": np.linspace(4, 3, 400)})
    writer.append("layers", {"step": np.repeat(steps, 2), "layer": ["patch_embed", XSS_LAYER] * 400,
                             "grad_l2": np.column_stack([first, later]).ravel()})
    writer.close()
    return path


def test_a_hostile_layer_name_stays_text_in_the_verdict_tables_and_plots(tmp_path):
    page = build_report([sl.load_run(hostile_layer_run(tmp_path / "hostile"))])
    rest = plotlyjs_removed(page)
    assert "<img" not in rest and "onerror=alert(3)>" not in rest
    text = page_text(rest)
    assert f"{XSS_LAYER} at step 152" in text and f"patch_embed vs {XSS_LAYER}" in text
    assert rest.count("<script") == 3 + rest.count('class="plot"')


def test_several_runs_compare_and_form_the_figure6_grid(grid_dirs):
    runs = sl.load_runs(grid_dirs)
    page = build_report(runs)
    assert "Comparison" in page and "Runs compared" in page and "Verdicts" in page
    assert "Figure 6 form" in page
    rest = plotlyjs_removed(page)
    for run in runs:
        assert f"<h2>{run.name}</h2>" in rest
    # overlays: kNN queue, kNN val, first layer; then 5 per run
    assert rest.count('class="plot"') == 3 + 5 * len(runs)


def test_the_figure6_grid_of_linear_probes_leaves_unprobed_cells_empty(grid_dirs, tmp_path):
    import shutil

    paths = [shutil.copytree(p, tmp_path / p.name) for p in grid_dirs]
    for path, top1 in zip(paths, [0.3125, 0.25, 0.375]):  # the last run (frozen, 3e-4) never probed
        writer = RunWriter(path, append=True)
        writer.append("linear", {"step": [1499], "protocol": ["fast"], "top1": [top1], "top5": [0.9],
                                 "n_val": [1000], "time": [pd.Timestamp.now(tz="UTC")]})
        writer.close()
    page = build_report(sl.load_runs(paths))
    assert "Final kNN top-1 (%), variant × learning rate (Figure 6 form)" in page
    grids = page[page.index("Linear-probe top-1 (%), variant × learning rate"):]
    rows = [page_text(row).split() for row in re.findall(r"<tr>(.*?)</tr>", grids[:grids.index("</table>")], re.S)]
    assert rows == [["patch", "projection", "base", "lr", "0.0001", "base", "lr", "0.0003"],
                    ["frozen", "37.50", "–"], ["learned", "31.25", "25.00"]]
    assert "linear_top1" in page_text(page)  # the compared table's column


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


def test_verdict_block_says_what_analyze_prints():
    """The report's verdict block and `stabilitylab analyze` come from one summarize_run dict:
    every sentence of one is in the other, on the committed run of the issue."""
    run = sl.load_run(SAMPLES / "findings" / "variants_lr1e-1" / "patch_proj=learned_seed0")
    summary = summarize_run(run)
    verdict = verdict_text(summary)
    analyze = format_summary(summary)
    text = page_text(build_report([run]))
    sentences = [verdict["headline"], verdict["rule"], verdict["spikes"], verdict["lead_lag"],
                 *verdict["excursions"], *verdict["dips"]]
    assert len(sentences) == 9
    for sentence in sentences:
        assert sentence in analyze and sentence in text, sentence
    assert "patch_embed at step 71: 26.6x its running median (spike)" in text
    assert "Spike events patch_embed 1, cls_token 3, blocks.2 1" in text


def test_the_rule_reaches_every_spike_number_of_the_report():
    run = sl.load_run(SINGLE)
    default, strict = build_report([run]), build_report([run], rule="ratio:1000")
    assert "27 spike event(s) in 6 layer(s)" in page_text(default)
    assert "no spike events, largest excursion blocks.2 121x at step 170" in page_text(strict)
    assert "ratio:1000" in strict and "(below the rule)" in strict
    figure4 = next(f for f in plot_specs(strict) if "Figure 4" in f["layout"]["title"]["text"])
    assert not [t for t in figure4["data"] if t.get("mode") == "markers"]


def test_single_run_report_of_a_committed_run_is_small():
    page = build_report([sl.load_run(SINGLE)])
    assert len(page.encode()) <= 2_500_000


def test_hovers_name_the_trace_and_show_3_significant_digits(single_html):
    for fig in plot_specs(single_html):
        assert fig["layout"]["hoverlabel"]["namelength"] == -1  # names never cut
        for trace in fig["data"]:
            template = trace.get("hovertemplate")
            if template:
                numbers = re.findall(r"%\{(?:y|z|customdata(?:\[\d\])?)(:[^}]*)?\}", template)
                assert numbers and all(fmt == ":.3g" for fmt in numbers if fmt), template
            else:
                assert trace.get("hoverinfo") == "skip" or trace["type"] == "histogram", trace


def test_knn_plot_draws_the_binomial_band_and_single_points():
    steps = [19, 39, 59]
    knn = pd.DataFrame({"step": steps + [39], "source": ["queue"] * 3 + ["val"], "k": 20,
                        "top1": [0.2, 0.3, 0.25, 0.4], "n_queries": [1000, 1000, 4000, 500], "epoch": 1.0})
    fig = plots.knn_figure(knn)
    band = next(t for t in fig.data if t.fill == "toself")
    queue = next(t for t in fig.data if t.name == "queue")
    val = next(t for t in fig.data if t.name == "val")
    p, n = np.array([0.2, 0.3, 0.25]), np.array([1000, 1000, 4000])
    two_sigma = 200 * np.sqrt(p * (1 - p) / n)
    np.testing.assert_allclose(band.y[:3], 100 * p + two_sigma)
    np.testing.assert_allclose(band.y[3:], (100 * p - two_sigma)[::-1])
    assert "markers" in queue.mode and "markers" in val.mode
    assert val.error_y.visible and val.error_y.array[0] == pytest.approx(200 * np.sqrt(0.4 * 0.6 / 500))
    assert not queue.error_y.visible  # the band shows it


def test_figure4_marks_every_spike_of_every_plotted_layer():
    """The issue's example: blocks.2 at 121x at step 170 of the batch-512 run is marked."""
    run = sl.load_run(SINGLE)
    grad_norms = run.grad_norms()
    events = find_spikes(grad_norms)
    fig = plots.relative_grad_figure(grad_norms, spikes=events)
    layers = [t.name for t in fig.data if t.mode == "lines" and not t.name.startswith("rule")]
    assert layers == ["patch_embed", "blocks.2", "blocks.3"]
    for layer in layers:
        marks = next((t for t in fig.data if t.name.startswith(f"{layer} spikes")), None)
        expected = events.loc[events["layer"] == layer, "peak_step"].tolist()
        assert expected and list(marks.x) == expected, layer
    marks = next(t for t in fig.data if t.name.startswith("blocks.2 spikes"))
    assert 170 in marks.x and max(marks.y) == pytest.approx(121, abs=0.5)
    rules = [t.name for t in fig.data if t.name.startswith("rule")]
    assert rules == ["rule: mad:6+ratio:3", "rule: ratio:10"]
    fig = plots.relative_grad_figure(grad_norms)  # spikes found with the rule when not given
    assert sum(len(t.x) for t in fig.data if t.mode == "markers") == len(
        events[events["layer"].isin(layers)])


def test_lag_histogram_has_one_bin_per_whole_step():
    matches = pd.DataFrame({"lag": [-2.0, 3.0, 3.0, 10.0]})
    fig = plots.lag_histogram(matches, max_lag=10)
    bins = fig.data[0].xbins
    assert (bins.start, bins.end, bins.size) == (-10.5, 10.5, 1)
    assert fig.layout.xaxis.dtick == 1 and fig.layout.yaxis.dtick == 1


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
    path = write_report([sl.load_run(grid_dirs[0])], tmp_path / "out" / "report.html", rule="ratio:10")
    assert path.is_file() and path.stat().st_size > 1_000_000 and "ratio:10" in path.read_text()
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


def test_keys_of_how_a_run_ran_do_not_split_a_setting(tmp_path):
    """Two seeds, one launched with a progress bar and a newer trainer's heap setting (as the
    committed r1_lr_hot seeds are): one setting, unless the key is asked for."""
    from stabilitylab.figures import setting_labels

    config = bench.synthetic_config(base_lr=1e-3)
    dirs = [bench.write_synthetic_run(tmp_path / "s0", 200, 3, seed=0, config={
                **config, "seed": 0, "threads": 1, "log": {"progress": False}}),
            bench.write_synthetic_run(tmp_path / "s1", 200, 3, seed=1, config={
                **config, "seed": 1, "threads": 2, "keep_heap": True, "log": {"progress": True}})]
    runs = sl.load_runs(dirs)
    assert setting_labels(runs) == ["all", "all"]
    assert setting_labels(runs, keys=["log.progress"]) == ["progress=False", "progress=True"]
    assert "log.progress" not in sl.concat_runs(runs, "knn").columns
    assert "threads" not in sl.concat_runs(runs, "knn").columns
    assert seed_spread(compare_runs(runs))["n_seeds"].tolist() == [2]  # one setting over both seeds
    assert compare_runs(runs, by="threads")["threads"].tolist() == [1, 2]  # asked for, it shows
    hot = sl.load_runs(SAMPLES / "findings" / "r1_lr_hot")
    assert setting_labels(hot) == ["base_lr=0.128", "base_lr=0.128", "base_lr=0.064"]


def test_every_runtime_key_is_a_trainer_option():
    """A mistyped RUNTIME_KEYS entry would silently hide nothing."""
    from analysis import RUNTIME_KEYS
    from trainer.config import TrainConfig, option

    for key in RUNTIME_KEYS:
        option(TrainConfig(), key)  # raises for a key TrainConfig does not have


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


def test_a_sweep_is_grouped_by_setting_colour_per_setting_line_style_per_seed():
    from plotly.colors import qualitative

    runs = sl.load_runs(SAMPLES / "findings" / "variants_lr1e-1")
    styles = plots.run_styles(runs)
    assert set(plots.PALETTE) == set(qualitative.Safe)  # plotly's colour-blind-safe palette
    by_setting = {}
    for run, style in zip(runs, styles):
        by_setting.setdefault(style.setting, []).append((run.config_value("seed"), style.color, style.dash))
    assert sorted(by_setting) == [f"patch_proj={v}" for v in ("batchnorm", "frozen", "learned", "weightnorm")]
    assert len({members[0][1] for members in by_setting.values()}) == 4  # one distinct colour each
    for members in by_setting.values():
        assert [seed for seed, _, _ in members] == [0, 1, 2]
        assert len({color for _, color, _ in members}) == 1
        assert [dash for _, _, dash in members] == ["solid", "dash", "dot"]
    fig = plots.overlay_knn(runs, source="val", styles=styles)
    assert [t.line.color for t in fig.data] == [s.color for s in styles]
    assert {t.legendgrouptitle.text for t in fig.data} == set(by_setting)
    assert fig.layout.height >= 20 * len(runs)  # the legend fits without scrolling


def test_sweep_report_has_a_short_title_and_a_seed_band_per_setting():
    runs = sl.load_runs(SAMPLES / "findings" / "variants_lr1e-1")
    page = build_report(runs)
    assert "<h1>variants_lr1e-1: 12 runs</h1>" in page
    band = next(f for f in plot_specs(page) if "mean and ±1 sd over seeds" in f["layout"]["title"]["text"])
    means = {t["name"]: t for t in band["data"] if t.get("showlegend", True)}  # the bands have no legend entry
    assert sorted(means) == [f"patch_proj={v} (n=3)" for v in ("batchnorm", "frozen", "learned", "weightnorm")]
    learned = [r for r in runs if r.config_value("model.patch_proj") == "learned"]
    val = pd.concat([r.knn[r.knn["source"] == "val"].groupby("step")["top1"].last() * 100 for r in learned],
                    axis=1, join="inner")
    fig = plots.seed_band_figure(runs)  # the same figure as a plotly object (JSON holds base64 arrays)
    mean = next(t for t in fig.data if t.name == "patch_proj=learned (n=3)")
    np.testing.assert_allclose(mean.y, val.mean(axis=1).to_numpy())
    np.testing.assert_allclose(mean.customdata, val.std(axis=1, ddof=1).to_numpy())


def test_first_layer_overlay_names_the_layer_of_frozen_runs():
    runs = sl.load_runs(SAMPLES)  # learned and frozen at two lrs
    fig = plots.overlay_first_layer(runs)
    names = {t.name for t in fig.data}
    assert names == {"learned_lr1e-2 (patch_embed)", "learned_lr1e-1 (patch_embed)",
                     "frozen_lr1e-2 (cls_token)", "frozen_lr1e-1 (cls_token)"}
    assert "cls_token: the first logged layer of a run whose patch projection is frozen" in fig.layout.title.text


def axes_and_legend(fig):
    """(axes tight bbox, legend bbox) of a drawn matplotlib figure, in pixels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    return fig.axes[0].get_tightbbox(renderer), fig.legends[0].get_window_extent(renderer)


def test_static_figure_legends_never_cover_or_squeeze_the_axes():
    from stabilitylab.figures import knn_plot, knn_seeds_plot

    runs = sl.load_runs(SAMPLES / "findings" / "variants_lr1e-1")
    one_axes, _ = axes_and_legend(knn_plot(runs[:1]))
    long_labels = knn_seeds_plot(runs, keys=["model.patch_proj", "optim.base_lr", "optim.batch_size"])
    for fig in (knn_plot(runs), knn_seeds_plot(runs), knn_plot(runs[:1]), long_labels):
        axes, legend = axes_and_legend(fig)
        assert not axes.overlaps(legend) and legend.y1 <= axes.y0
        assert axes.height >= 0.97 * one_axes.height  # the figure grew instead
        assert 0 <= legend.x0 and legend.x1 <= fig.bbox.width  # no entry cut at the sides
    overlay = knn_plot(runs)
    labels = [t.get_text() for t in overlay.legends[0].get_texts()]
    assert labels == [f"patch_proj={v}" for v in ("batchnorm", "frozen", "learned", "weightnorm")] + [
        "1st seed", "2nd seed", "3rd seed", "queue (line)", "val (markers)"]


def test_static_knn_figure_shows_a_run_s_linear_probes_as_the_report_does():
    """The probed sample's fast probe (20.8% at step 155, 1,000 images) is a diamond with its
    +-2 sigma bar and a legend entry, as in the HTML report; a run never probed has neither."""
    from matplotlib.collections import LineCollection

    from stabilitylab.figures import knn_plot

    fig = knn_plot([sl.load_run(SAMPLES / "probed" / "learned_lr1e-1")])
    [diamond] = [line for line in fig.axes[0].get_lines() if line.get_marker() == "D"]
    assert list(diamond.get_xdata()) == [155] and diamond.get_ydata()[0] == pytest.approx(20.8)
    [bar] = [c for c in fig.axes[0].collections if isinstance(c, LineCollection)]
    (_, low), (_, high) = bar.get_segments()[0]
    assert high - low == pytest.approx(400 * np.sqrt(0.208 * 0.792 / 1000))
    assert "linear probe (fast, ±2σ)" in [t.get_text() for t in fig.legends[0].get_texts()]
    plain = knn_plot([sl.load_run(SAMPLES / "learned_lr1e-2")])
    assert not [line for line in plain.axes[0].get_lines() if line.get_marker() == "D"]


def test_static_figure4_marks_the_rule_s_spikes():
    from stabilitylab.figures import first_last_plot

    grad_norms = sl.load_run(SINGLE).grad_norms()
    for rule in (None, "ratio:10", "ratio:1000"):
        ax = first_last_plot(grad_norms, rule=rule).axes[0]
        marked = sum(len(line.get_xdata()) for line in ax.get_lines() if line.get_marker() == "x")
        events = find_spikes(grad_norms[["patch_embed", "blocks.3"]], rule)
        assert marked == len(events)
    assert marked == 0


PROBED = SAMPLES / "probed" / "learned_lr1e-1"
XSS_MITIGATION = "<img src=x onerror=alert(4)>"


def test_a_probed_run_shows_its_probes_replays_linear_probe_and_collapse_signals():
    """The committed run with every instrument: optimizer state and attention (first layer and
    last block side by side), its replay window, the linear probe in the verdict and on the
    kNN figure, the representation-collapse panels; numbers against the run's own tables."""
    from analysis import linear_curve
    from stabilitylab import plots_probes

    run = sl.load_run(PROBED)
    page = build_report([run])
    assert len(page.encode()) <= 2_500_000
    text = page_text(plotlyjs_removed(page))
    headings = re.findall(r"<h3>(.*?)</h3>", page)
    assert headings[-3:] == ["Optimizer state", "Attention", "Replay at step 96"]
    line = "Linear probe (fast, step 155): top-1 20.8% / top-5 70.8% (1,000 images)"
    assert line in text and line in format_summary(summarize_run(run))
    titles = [spec["layout"]["title"]["text"] for spec in plot_specs(page)]
    assert sum(t.startswith("Optimizer state") or t.startswith("Attention") or t.startswith("Replay at")
               for t in titles) == 3

    optimizer = plots_probes.optimizer_state_figure(run)
    assert [a.text for a in optimizer.layout.annotations] == ["patch_embed", "blocks.3"]
    attention = plots_probes.attention_figure(run)
    assert [a.text for a in attention.layout.annotations] == ["blocks.0", "blocks.3"]
    # blocks.0's one gradient spike (step 96) as a line through both rows of its column only
    assert sorted((s.x0, s.xref) for s in attention.layout.shapes) == [(96, "x"), (96, "x3")]

    knn = plots.knn_figure(run.knn, find_knn_dips(run.knn), linear=linear_curve(run.linear))
    [probe] = [t for t in knn.data if t.name == "linear probe (fast)"]
    assert list(probe.x) == [155] and list(probe.y) == pytest.approx([100 * run.linear["top1"].iloc[0]])
    rank = {t.name: t for t in knn.data if t.name.endswith("effective rank")}
    val = run.knn[run.knn["source"] == "val"]
    assert list(rank["val effective rank"].y) == pytest.approx(val["effective_rank"].tolist())
    assert {t.yaxis for t in knn.data if t.name.endswith("feature std")} == {"y3"}

    [section] = plots_probes.replay_sections(run)
    [table] = section.tables
    assert table["replay"].tolist() == ["original", "unchanged replay", "model.patch_proj=frozen",
                                        "optim.betas=[0.9,0.95]"]
    assert table.set_index("replay").at["original", "cls_token"] == 417.4  # the verdict's 417x at step 96
    assert "417x at step 96" in text and "kNN top-1 (val) at step 116 (%)" in text


def test_a_hostile_replay_mitigation_stays_text(tmp_path):
    import shutil

    path = shutil.copytree(PROBED, tmp_path / "run")
    meta_path = path / "replays" / "s96_n40_optim.betas-0.9_0.95" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["replay"]["mitigation"] = XSS_MITIGATION
    meta_path.write_text(json.dumps(meta))
    page = build_report([sl.load_run(path)])
    rest = plotlyjs_removed(page)
    assert "<img" not in rest and "onerror=alert(4)>" not in rest
    assert f"{XSS_MITIGATION} 18.2 417.4" in page_text(rest)  # its row of the replay table
    # escaped as HTML text inside the plot JSON: its bar and its two kNN lines (queue, val)
    assert rest.count("\\u0026lt;img src=x onerror=alert(4)\\u0026gt;") >= 3
    assert rest.count("<script") == 3 + rest.count('class="plot"')
