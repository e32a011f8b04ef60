"""One self-contained HTML report of one or several runs, offline.

`build_report(runs)` returns the HTML, `write_report(runs, path)` writes it and
`write_figures(runs, directory)` writes PNG/PDF figures for papers. The page is rendered
from the Jinja2 templates in `stabilitylab/templates/` with autoescaping, so every run name,
path and config value is escaped by the template engine; plot specs go into
`<script type="application/json">` blocks with `<`, `>`, `&` written as `\\u` escapes. The
verdict block of a run shows `analysis.verdict_text` of the same `summarize_run` dict that
`stabilitylab analyze` prints. The mechanism-probe and replay sections are the `Section`s of
`stabilitylab.plots_probes`, rendered by the template's `section` macro. plotly.js is inlined once, gzip-compressed and
base64-encoded (about 2 MB instead of 4.8 MB); the page inflates it with the browser's
DecompressionStream. The figures come from `stabilitylab.plots`; no torch is imported.
"""
from __future__ import annotations

import base64
import functools
import gzip
import itertools
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import jinja2
import pandas as pd
import plotly.io as pio
from markupsafe import Markup
from plotly.offline import get_plotlyjs

import stabilitylab
from analysis import compare_runs, display_table, figure6_table, knn_curves, linear_curve
from analysis.summary import RunAnalysis, analyze_run, verdict_text
from stabilitylab import plots, plots_probes
from stabilitylab.figures import write_figures

__all__ = ["build_report", "write_report", "write_figures"]

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
KEY_CONFIG = [("dataset", "data.dataset"), ("data path", "data.path"), ("model preset", "model.preset"),
              ("patch projection", "model.patch_proj"), ("base lr", "optim.base_lr"),
              ("batch size", "optim.batch_size"), ("optimizer", "optim.name")]
OVERVIEW_COLUMNS = ["run", "status", "dataset", "model preset", "patch projection", "base lr",
                    "batch size", "optimizer", "duration", "steps logged"]
SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
TITLE_NAMES = 4  # a title names at most this many runs
FIGURE6_VALUES = [("Final kNN top-1 (%), variant × learning rate (Figure 6 form)", "final_top1"),
                  ("Linear-probe top-1 (%), variant × learning rate (Figure 6 form)", "linear_top1")]

TEMPLATES = jinja2.Environment(loader=jinja2.PackageLoader("stabilitylab", "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined,
                               trim_blocks=True, lstrip_blocks=True)


def script_json(text: str) -> Markup:
    """JSON made safe inside <script>: `<`, `>`, `&` (and JS line separators) as \\u escapes."""
    for char, escaped in SCRIPT_ESCAPES.items():
        text = text.replace(char, escaped)
    return Markup(text)


def breakable(text) -> Markup:
    """Escaped text with a line-break opportunity after each `_`, `.` and `=`, so long run
    names and column names wrap at word parts in narrow table cells."""
    escaped = Markup.escape(str(text))
    for char in "_.=":
        escaped = escaped.replace(char, Markup(f"{char}<wbr>"))
    return escaped


TEMPLATES.filters["script_json"] = script_json
TEMPLATES.filters["breakable"] = breakable


@functools.cache
def plotly_gz() -> str:
    """plotly.js (the installed plotly's bundle), gzip-compressed and base64-encoded."""
    return base64.b64encode(gzip.compress(get_plotlyjs().encode("utf-8"), mtime=0)).decode("ascii")


@dataclass
class Table:
    """Cells as text, for the template's `table` macro (which escapes them)."""

    columns: list[str]
    rows: list[list[str]]
    numeric: list[bool]


def table(df: pd.DataFrame, formats: dict | None = None) -> Table:
    """A DataFrame as a `Table`: `formats` maps a column to a function of its value; other
    numbers to 4 significant digits, missing values as '–'."""
    formats = formats or {}

    def cell(column, value):
        if column in formats:
            return formats[column](value)
        if value is None or (not isinstance(value, (list, dict, str)) and pd.isna(value)):
            return "–"
        if isinstance(value, float):
            return f"{value:.4g}"
        return str(value)

    numeric = [pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c]) for c in df.columns]
    rows = [[cell(c, v) for c, v in zip(df.columns, row)] for row in df.itertuples(index=False)]
    return Table([str(c) for c in df.columns], rows, numeric)


def _pct(v) -> str:
    return "–" if pd.isna(v) else f"{100 * v:.2f}%"


class _Plots:
    """Turns figures into {id, spec} for the template's `plot` macro, with unique ids."""

    def __init__(self):
        self._ids = itertools.count()

    def __call__(self, fig) -> dict:
        return {"id": f"plot-{next(self._ids)}", "spec": pio.to_json(fig, validate=False)}


def short_title(runs) -> str:
    """The run's name; up to TITLE_NAMES names; else the common folder and the count."""
    names = [run.name for run in runs]
    if len(names) <= TITLE_NAMES:
        return ", ".join(names)
    parents = {Path(run.path).resolve().parent.name for run in runs}
    where = next(iter(parents)) if len(parents) == 1 else f"{', '.join(names[:2])}, …"
    return f"{where}: {len(names)} runs"


def build_report(runs, *, title: str | None = None, rule=None) -> str:
    """The HTML report of `runs` (a list of `Run`): one section per run, plus a comparison
    section when there are several. rule: the `SpikeRule` (or its text) of every spike
    number, mark and verdict; default `analysis.DEFAULT_RULE`."""
    runs = list(runs)
    if not runs:
        raise ValueError("build_report needs at least one run")
    analyses = [analyze_run(run, rule=rule) for run in runs]
    plot = _Plots()
    comparison = _comparison(runs, analyses, plot, rule) if len(runs) > 1 else None
    sections = [_run_section(run, a, plot, heading=len(runs) > 1) for run, a in zip(runs, analyses)]
    return TEMPLATES.get_template("report.html.j2").render(
        title=title or short_title(runs), comparison=comparison, runs=sections, plotly_gz=plotly_gz(),
        plot_config=PLOTLY_CONFIG, version=stabilitylab.__version__,
        generated=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def write_report(runs, path, *, title: str | None = None, rule=None) -> Path:
    """Write `build_report(runs)` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(runs, title=title, rule=rule), encoding="utf-8")
    return path


# ------------------------------------------------------------------ one run

def _run_section(run, a: RunAnalysis, plot: _Plots, heading: bool) -> dict:
    verdict = verdict_text(a.summary)
    section = dict(name=run.name, heading=heading, header=list(_key_values(run).items()), verdict=verdict,
                   status=_status(run), empty=run.steps.empty and run.knn.empty and a.grad_norms.empty,
                   loss=None, knn=None, dips=None, heatmap=None, relative=None, lead_lag=None, probes=[])
    if len(run.steps):
        section["loss"] = plot(plots.loss_figure(run.steps))
    if len(run.knn):
        section["knn"] = plot(plots.knn_figure(run.knn, a.dips, linear=linear_curve(run.linear)))
    if len(a.dips):
        section["dips"] = _dips_table(a.dips)
    if not a.grad_norms.empty:
        section["heatmap"] = plot(plots.grad_heatmap(a.grad_norms))
        section["relative"] = plot(plots.relative_grad_figure(
            a.grad_norms, layers=_figure4_layers(a), spikes=a.events, rule=a.rule))
    ll = a.lead_lag
    if ll is not None and ll.last is not None:
        section["lead_lag"] = dict(
            summary=ll.summary, table=table(ll.per_layer, {"frac_first_leads": _pct}),
            histogram=plot(plots.lag_histogram(ll.matches, ll.max_lag)) if len(ll.matches) else None)
    probes = [plots_probes.optimizer_state_section(run, rule=a.rule), plots_probes.attention_section(run, rule=a.rule),
              *plots_probes.replay_sections(run, rule=a.rule)]
    section["probes"] = [_section(s, plot) for s in probes if s is not None]
    return section


def _section(s: plots_probes.Section, plot: _Plots) -> dict:
    """A `plots_probes.Section` for the template's `section` macro."""
    return dict(title=s.title, note=s.note, plots=[plot(fig) for fig in s.figures],
                tables=[table(t) for t in s.tables])


def _figure4_layers(a: RunAnalysis) -> list[str]:
    """First layer, a middle block and the last block; the lead-lag's first and last when
    the run has them, so the figure shows the layers the verdict speaks of."""
    layers = plots.default_layers(a.grad_norms.columns)
    if a.lead_lag is not None:
        layers = [a.lead_lag.first, *layers[1:-1], a.lead_lag.last or layers[-1]]
    return list(dict.fromkeys(layers))


def _status(run) -> str:
    meta = run.meta or {}
    status = meta.get("status", "unknown")
    return f"{status}: {meta['error']}" if meta.get("error") else status


def _key_values(run) -> dict:
    """Status, key config values, duration, steps and kNN numbers of a run, as text."""
    values = {"status": _status(run)}
    values.update({name: run.config_value(key) for name, key in KEY_CONFIG})
    values["device"] = (run.meta or {}).get("device")
    values["duration"] = _duration(run)
    values["steps logged"] = f"{len(run.steps):,}" + (
        f" (last step {int(run.steps['step'].iloc[-1]):,})" if len(run.steps) else "")
    for source, curve in knn_curves(run.knn).items():
        top1 = curve["top1"]
        values[f"kNN top-1 ({source})"] = (f"final {100 * top1.iloc[-1]:.2f}%, best "
                                           f"{100 * top1.max():.2f}% at step {top1.idxmax():,}")
    return {k: "–" if v is None else str(v) for k, v in values.items()}


def _timestamp(value):
    try:
        stamp = pd.Timestamp(value)
    except (TypeError, ValueError):
        return None
    if stamp is pd.NaT:
        return None
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp


def _duration(run) -> str | None:
    """end_time - start_time; for a run without an end, up to its last logged step."""
    meta = run.meta or {}
    start, end, suffix = _timestamp(meta.get("start_time")), _timestamp(meta.get("end_time")), ""
    if end is None and "time" in run.steps and run.steps["time"].notna().any():
        end, suffix = _timestamp(run.steps["time"].max()), " (to the last logged step)"
    if start is None or end is None:
        return None
    seconds = int((end - start).total_seconds())
    days, rest = divmod(seconds, 86400)
    text = f"{rest // 3600} h {rest % 3600 // 60} min" if seconds >= 60 else f"{seconds} s"
    return (f"{days} d " if days else "") + text + suffix


def _dips_table(dips: pd.DataFrame) -> Table:
    columns = ["source", "start_step", "bottom_step", "end_step", "peak", "bottom", "depth", "depth_noise",
               "recovered"]
    shown = dips[columns].assign(status=plots.dip_status(dips))
    return table(shown, {c: _pct for c in ("peak", "bottom", "depth")} | {"depth_noise": lambda v: f"{v:.3g}"})


# ------------------------------------------------------------------ several runs

def _comparison(runs, analyses, plot: _Plots, rule) -> dict:
    overview = pd.DataFrame([{"run": r.name, **_key_values(r)} for r in runs])
    compared = compare_runs(runs, rule=rule)
    styles = plots.run_styles(runs)
    figures = []
    sources = sorted({s for r in runs for s in knn_curves(r.knn)})
    settings = [s.setting for s in styles]
    if sources and len(set(settings)) < len(settings):  # some setting has several seeds
        figures.append(plots.seed_band_figure(runs, source="val" if "val" in sources else sources[0],
                                              styles=styles))
    figures += [plots.overlay_knn(runs, source=source, styles=styles) for source in sources]
    if any(len(a.grad_norms) for a in analyses):
        figures.append(plots.overlay_first_layer(runs, styles=styles))
    return dict(overview=table(overview[OVERVIEW_COLUMNS]),
                verdicts=[(r.name, verdict_text(a.summary)["headline"]) for r, a in zip(runs, analyses)],
                compared=table(display_table(compared)), plots=[plot(fig) for fig in figures],
                figure6=[(heading, grid) for heading, value in FIGURE6_VALUES
                         if (grid := _figure6(compared, value)) is not None])


def _figure6(compared: pd.DataFrame, value: str) -> Table | None:
    """figure6_table of `value` (in %) when the runs form a grid of >= 2 variants x >= 2 lrs
    and some run has the value."""
    variant, lr = "model.patch_proj", "optim.base_lr"
    if not {variant, lr, value} <= set(compared.columns) or compared[value].isna().all():
        return None
    if compared[variant].nunique() < 2 or compared[lr].nunique() < 2:
        return None
    grid = figure6_table(compared, variant=variant, lr=lr, value=value) * 100
    grid.columns = [f"base lr {c:g}" for c in grid.columns]
    return table(grid.rename_axis("patch projection").reset_index(),
                 {c: (lambda v: "–" if pd.isna(v) else f"{v:.2f}") for c in grid.columns})
