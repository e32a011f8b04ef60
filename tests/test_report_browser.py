"""The HTML report in a real headless Chromium (Playwright): every plot renders from a
file:// URL with no console error, and a hostile run name stays text."""
import importlib.util
from pathlib import Path

import pytest

import stabilitylab as sl
from stabilitylab.report import write_report

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
XSS_NAME = "<script>alert(1)</script>"

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing (apt-get install chromium)")]
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")

ROOT = Path(__file__).resolve().parents[1]
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


def open_report(browser, path: Path):
    """Open `path`, wait for every plot; returns (page, errors, dialogs)."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors, dialogs = [], []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    page.goto(path.resolve().as_uri())
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
    assert "The first layer leads" in page.inner_text(".verdict")
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
