"""The HTML report in a real headless Chromium (Playwright): the compressed plotly.js unpacks
and every plot renders from a file:// URL with no console error and no request but the page
itself, a lone kNN evaluation is drawn, the tables fit a 1,400 px window, and a hostile run
name stays text."""
import importlib.util
from pathlib import Path

import pytest

import numpy as np

import stabilitylab as sl
from analysis import summarize_run
from analysis.summary import verdict_text
from stabilitylab.report import write_report
from stabilitylab.rundir import RunWriter, write_meta

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
XSS_NAME = "<script>alert(1)</script>"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "data_samples" / "runs"
SINGLE = SAMPLES / "findings" / "batch512_long_lr1e-1" / "batch_size=512_seed0"
_spec = importlib.util.spec_from_file_location("bench_report", ROOT / "benchmarks" / "bench_report.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [bench.write_synthetic_run(root / f"{variant}_lr{lr}", 6000 if i == 0 else 1500, 6, seed=i,
                                      config=bench.synthetic_config(patch_proj=variant, base_lr=lr))
            for i, (variant, lr) in enumerate([(v, lr) for v in ("learned", "frozen") for lr in (1e-4, 3e-4)])]


def open_report(browser, path: Path, width: int = 1280):
    """Open `path`, wait for every plot; returns (page, errors, dialogs). Any request but
    the page itself is an error (the report must work offline)."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    url = path.resolve().as_uri()
    page.on("request", lambda request: request.url != url and errors.append(f"request {request.url}"))
    page.goto(url)
    expected = path.read_text().count('class="plot"')
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {expected}",
                           timeout=30_000)
    return page, errors, dialogs


def rendered_plots(page) -> list[dict]:
    """Per plot div: traces given, points of the largest drawn trace, whether an SVG was drawn.

    Points come from plotly's `_fullData` (the decoded traces: the given `data` still holds
    the base64 arrays)."""
    return page.evaluate("""() => Array.from(document.querySelectorAll('.plot')).map(d => ({
        plotly: d.classList.contains('js-plotly-plot'),
        traces: (d.data || []).length,
        points: Math.max(0, ...(d._fullData || []).map(t => t._length || (t.z || []).length || 0)),
        svg: d.querySelector('.main-svg') !== null}))""")


def check_all_rendered(page, expected: int):
    plots = rendered_plots(page)
    assert len(plots) == expected
    for i, plot in enumerate(plots):
        assert plot["plotly"] and plot["svg"], f"plot {i} not rendered: {plot}"
        assert plot["traces"] > 0 and plot["points"] > 0, f"plot {i} has no data: {plot}"


def test_single_run_report_renders(browser, runs, tmp_path):
    path = write_report([sl.load_run(runs[0])], tmp_path / "single.html")
    page, errors, dialogs = open_report(browser, path)
    assert errors == [] and dialogs == []
    check_all_rendered(page, 5)
    assert "patch_embed spikes lead blocks.2 spikes" in page.inner_text(".verdict")
    page.close()


def test_committed_single_run_report_is_small_and_renders(browser, tmp_path):
    run = sl.load_run(SINGLE)
    path = write_report([run], tmp_path / "single.html")
    assert path.stat().st_size <= 2_500_000
    page, errors, dialogs = open_report(browser, path)
    assert errors == [] and dialogs == []
    check_all_rendered(page, 5)
    assert verdict_text(summarize_run(run))["headline"] in page.inner_text(".verdict .headline")
    page.close()


def test_the_probed_run_report_renders_its_probe_and_replay_sections(browser, tmp_path):
    path = write_report([sl.load_run(SAMPLES / "probed" / "learned_lr1e-1")], tmp_path / "probed.html")
    assert path.stat().st_size <= 2_500_000
    page, errors, dialogs = open_report(browser, path)
    assert errors == [] and dialogs == []
    check_all_rendered(page, 7)  # loss, kNN (+ linear, rank, std), heatmap, Figure 4, optimizer, attention, replay
    assert "Linear probe (fast, step 155): top-1 20.8%" in page.inner_text(".verdict")
    text = page.inner_text("body")
    for heading in ("Optimizer state", "Attention", "Replay at step 96"):
        assert heading in text
    knn = page.locator(".plot").nth(1)
    assert knn.locator(".cartesianlayer .subplot").count() == 3  # top-1, effective rank, feature std
    page.close()


def test_the_real_instability_report_renders_every_section(browser, tmp_path):
    """configs/cpu_unstable.yaml's committed seed 0 (3,000 steps, every probe, five replays):
    every plot renders, and the page says what analyze says."""
    run = sl.load_run(SAMPLES / "findings" / "r1_lr_hot" / "base_lr=1.28e-1_seed0")
    path = write_report([run], tmp_path / "unstable.html")
    assert path.stat().st_size <= 4_000_000  # 3,000 steps x 13 layers of norms and optimizer state
    page, errors, dialogs = open_report(browser, path)
    assert errors == [] and dialogs == []
    check_all_rendered(page, 8)  # loss, kNN, heatmap, Figure 4, lag histogram, optimizer, attention, replay
    assert verdict_text(summarize_run(run))["headline"] in page.inner_text(".verdict .headline")
    text = page.inner_text("body")
    for heading in ("Lead-lag of gradient spikes", "Optimizer state", "Attention", "Replay at step 1100"):
        assert heading in text
    page.close()


def test_a_lone_knn_evaluation_is_drawn(browser, tmp_path):
    run_dir = tmp_path / "lone"
    write_meta(run_dir, {"status": "running"})
    writer = RunWriter(run_dir)
    writer.append("steps", {"step": np.arange(30), "loss": np.linspace(5, 4, 30)})
    writer.append("knn", {"step": [19], "epoch": [0.5], "source": ["val"], "k": [20], "top1": [0.23],
                          "n_queries": [1000]})
    writer.close()
    page, errors, _ = open_report(browser, write_report([sl.load_run(run_dir)], tmp_path / "lone.html"))
    assert errors == []
    knn = page.locator(".plot").nth(1)
    assert knn.locator(".scatterlayer .trace .points path").count() == 1  # the marker
    assert knn.locator(".scatterlayer .trace .errorbar").count() == 1  # its +-2 sigma bar
    page.close()


def test_tables_fit_a_1400_px_window(browser, tmp_path):
    path = write_report(sl.load_runs(SAMPLES / "findings" / "variants_lr1e-2"), tmp_path / "sweep.html")
    page, errors, _ = open_report(browser, path, width=1400)
    assert errors == []
    assert page.evaluate("document.documentElement.scrollWidth") <= 1400
    overflowing = page.evaluate("""() => Array.from(document.querySelectorAll('.table-wrap'))
        .filter(w => w.scrollWidth > w.clientWidth + 1).map(w => w.innerText.slice(0, 80))""")
    assert overflowing == []
    page.close()


@pytest.fixture(scope="module")
def multi_report(browser, runs, tmp_path_factory):
    """One page for the multi-run checks (loading plotly.js is the slow part): four runs,
    one with a hostile name and config value."""
    loaded = sl.load_runs(runs)
    loaded[1].name = XSS_NAME
    loaded[1].config = {**loaded[1].config, "data": {"dataset": "x</script><script>alert(2)</script>"}}
    path = write_report(loaded, tmp_path_factory.mktemp("multi") / "multi.html")
    page, errors, dialogs = open_report(browser, path)
    yield page, errors, dialogs
    page.close()


def test_multi_run_report_renders(multi_report, runs):
    page, errors, dialogs = multi_report
    assert errors == []
    check_all_rendered(page, 3 + 5 * len(runs))
    assert "Figure 6 form" in page.inner_text("body")


def test_hostile_run_name_is_shown_as_text(multi_report):
    page, errors, dialogs = multi_report
    assert dialogs == [] and errors == []
    assert page.locator("h2", has_text=XSS_NAME).is_visible()
    assert "x</script><script>alert(2)</script>" in page.inner_text("body")
    legend = page.evaluate("Array.from(document.querySelectorAll('.legendtext')).map(e => e.textContent)")
    assert XSS_NAME in legend
