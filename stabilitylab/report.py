"""One self-contained HTML report of one or several runs (plotly.js inlined once, offline).

`build_report(runs)` returns the HTML, `write_report(runs, path)` writes it and
`write_figures(runs, directory)` writes PNG/PDF figures for papers. The figures come from
`stabilitylab.plots`; the numbers from `analysis`. No torch is imported.
"""
from __future__ import annotations

import html
import itertools
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import plotly.io as pio
from plotly.offline import get_plotlyjs

import stabilitylab
from analysis import (LeadLagResult, compare_runs, figure6_table, find_knn_dips, find_spikes, knn_curves,
                      spike_lead_lag)
from stabilitylab import plots
from stabilitylab.figures import write_figures

__all__ = ["build_report", "write_report", "write_figures"]

FIRST_LAYER = "patch_embed"
PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
KEY_CONFIG = [("dataset", "data.dataset"), ("data path", "data.path"), ("model preset", "model.preset"),
              ("patch projection", "model.patch_proj"), ("base lr", "optim.base_lr"),
              ("batch size", "optim.batch_size"), ("optimizer", "optim.name")]
OVERVIEW_COLUMNS = ["run", "status", "dataset", "model preset", "patch projection", "base lr",
                    "batch size", "optimizer", "duration", "steps logged"]
SCRIPT_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 0; color: #222; }
main { max-width: 1200px; margin: 0 auto; padding: 1em 2em 3em; }
h1, h2 { word-break: break-all; } h1 { font-size: 1.6em; }
h2 { border-top: 2px solid #ddd; padding-top: .8em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f4f4f4; font-weight: 600; }
.verdict { background: #f6f8fa; border-left: 4px solid #4c78a8; padding: .6em 1em .6em 2em; }
p.verdict { padding-left: 1em; }
.empty { color: #a33; font-weight: 600; }
.plot { min-height: 420px; margin: 1em 0; }
footer { color: #888; font-size: .8em; margin-top: 3em; }
"""


def esc(value) -> str:
    """Text from a config, a path or a run name, escaped for HTML."""
    return html.escape(str(value))


def script_json(text: str) -> str:
    """JSON made safe inside <script>: `<`, `>`, `&` (and JS line separators) as \\u escapes."""
    for char, escaped in SCRIPT_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


@dataclass
class RunAnalysis:
    """What the report shows of one run, computed once."""

    grad_norms: pd.DataFrame
    dips: pd.DataFrame
    spikes: pd.DataFrame | None
    lead_lag: LeadLagResult | None

    @classmethod
    def of(cls, run) -> "RunAnalysis":
        grad_norms = run.grad_norms() if len(run.layers) else pd.DataFrame()
        dips = find_knn_dips(run.knn)
        lead_lag = None
        first = run.meta.get("first_layer") or FIRST_LAYER  # a foreign model's own first layer
        last = run.meta.get("last_block")
        if first in grad_norms.columns and len(grad_norms.columns) > 1:
            lead_lag = spike_lead_lag(grad_norms, first=first,
                                      last=last if last in grad_norms.columns and last != first else None)
            spikes = lead_lag.events
        else:
            spikes = find_spikes(grad_norms) if not grad_norms.empty else None
        return cls(grad_norms, dips, spikes, lead_lag)


class _Plots:
    """Turns figures into <div> + <script> pairs with unique ids."""

    def __init__(self):
        self._ids = itertools.count()

    def __call__(self, fig) -> str:
        div = f"plot-{next(self._ids)}"
        spec = script_json(pio.to_json(fig, validate=False))
        return (f'<div class="plot" id="{div}"></div>\n<script>(function () {{ var f = {spec};\n'
                f'Plotly.newPlot("{div}", f.data, f.layout, PLOT_CONFIG); }})();</script>')


def build_report(runs, *, title: str | None = None) -> str:
    """The HTML report of `runs` (a list of `Run`): one section per run, plus a comparison
    section when there are several."""
    runs = list(runs)
    if not runs:
        raise ValueError("build_report needs at least one run")
    title = title or "stabilitylab report: " + ", ".join(r.name for r in runs)
    analyses = [RunAnalysis.of(run) for run in runs]
    plot = _Plots()
    sections = [_comparison_section(runs, analyses, plot)] if len(runs) > 1 else []
    sections += [_run_section(run, a, plot, heading=len(runs) > 1) for run, a in zip(runs, analyses)]
    return _page(title, sections)


def write_report(runs, path, *, title: str | None = None) -> Path:
    """Write `build_report(runs)` to `path` (UTF-8); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(build_report(runs, title=title), encoding="utf-8")
    return path


def _page(title: str, sections: list[str]) -> str:
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    config = script_json(pio.json.to_json_plotly(PLOTLY_CONFIG))
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title>", f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        f"<script>var PLOT_CONFIG = {config};</script>", "</head>", "<body><main>",
        f"<h1>{esc(title)}</h1>", *sections,
        f"<footer>stabilitylab {esc(stabilitylab.__version__)}, generated {generated}</footer>",
        "</main></body></html>"])


# ------------------------------------------------------------------ one run

def _run_section(run, a: RunAnalysis, plot: _Plots, heading: bool) -> str:
    parts = [f"<section><h2>{esc(run.name)}</h2>" if heading else "<section>",
             _key_table(_key_values(run)), f'<p class="verdict">{esc(_verdict(run, a))}</p>']
    if run.steps.empty and run.knn.empty and a.grad_norms.empty:
        parts.append(f'<p class="empty">No steps logged yet (status: {esc(_status(run))}).</p>')
        return "\n".join(parts + ["</section>"])
    parts += ["<h3>Training curves</h3>",
              plot(plots.loss_figure(run.steps)) if len(run.steps) else _missing("steps")]
    parts += ["<h3>kNN monitor</h3>",
              plot(plots.knn_figure(run.knn, a.dips)) if len(run.knn) else _missing("kNN evaluations")]
    if len(a.dips):
        parts.append(_dips_table(a.dips))
    parts.append("<h3>Per-layer gradient norms</h3>")
    if a.grad_norms.empty:
        parts.append(_missing("per-layer gradient norms"))
    else:
        parts += [plot(plots.grad_heatmap(a.grad_norms)),
                  plot(plots.relative_grad_figure(a.grad_norms, spikes=a.spikes))]
        parts += _lead_lag_parts(a.lead_lag, plot)
    return "\n".join(parts + ["</section>"])


def _missing(what: str) -> str:
    return f'<p class="empty">No {esc(what)} logged yet.</p>'


def _status(run) -> str:
    meta = run.meta or {}
    status = meta.get("status", "unknown")
    return f"{status}: {meta['error']}" if meta.get("error") else status


def _config_value(run, dotted: str):
    node = run.config or {}
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _key_values(run) -> dict:
    """Status, key config values, duration, steps and kNN numbers of a run, as text."""
    values = {"status": _status(run)}
    values.update({name: _config_value(run, key) for name, key in KEY_CONFIG})
    values["device"] = (run.meta or {}).get("device")
    values["duration"] = _duration(run)
    values["steps logged"] = f"{len(run.steps):,}" + (
        f" (last step {int(run.steps['step'].iloc[-1]):,})" if len(run.steps) else "")
    for source, curve in knn_curves(run.knn).items():
        top1 = curve["top1"]
        values[f"kNN top-1 ({source})"] = (f"final {100 * top1.iloc[-1]:.2f}%, best "
                                           f"{100 * top1.max():.2f}% at step {top1.idxmax():,}")
    return {k: "–" if v is None else v for k, v in values.items()}


def _key_table(values: dict) -> str:
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in values.items())
    return f'<table class="keys">{rows}</table>'


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


def _verdict(run, a: RunAnalysis) -> str:
    """Plain words: how many dips (confirmed or not) and whether the first layer leads."""
    if run.knn.empty:
        text = "No kNN evaluations yet, so no dips to report."
    else:
        status = pd.Series(plots.dip_status(a.dips)).value_counts() if len(a.dips) else pd.Series()
        text = f"{len(a.dips)} kNN dip(s) over all sources"
        if len(a.dips):
            text += (f": {status.get('confirmed', 0)} confirmed by the other kNN source, "
                     f"{status.get('not confirmed', 0)} not confirmed, "
                     f"{status.get('unchecked', 0)} unchecked")
        text += "."
    ll = a.lead_lag
    if a.grad_norms.empty:
        return text + " No per-layer gradient norms yet."
    if ll is None:
        return text + (f" No lead-lag test: it needs {FIRST_LAYER} and a later layer among the "
                       "logged layers.")
    row = ll.per_layer.set_index("layer").loc[ll.last]
    detail = (f" (median lag {row['median_lag']:g} steps, p = {row['p_value']:.3g}, "
              f"{int(row['n_matched'])} matched spikes)") if row["n_matched"] else ""
    words = {"first leads": f"The first layer leads: {ll.first} spikes come before {ll.last} spikes",
             "not significant": f"No evidence that {ll.first} spikes lead {ll.last} spikes",
             "no matched spikes": f"No {ll.last} spike had a {ll.first} spike nearby, so no lead-lag"}
    return text + " " + words.get(ll.verdict, ll.verdict) + detail + "."


def _table(df: pd.DataFrame, formatters: dict | None = None) -> str:
    """A DataFrame as an HTML table; pandas escapes every cell."""
    return df.to_html(index=False, escape=True, border=0, na_rep="–", formatters=formatters,
                      float_format=lambda v: f"{v:.4g}")


def _pct(v) -> str:
    return "–" if pd.isna(v) else f"{100 * v:.2f}%"


def _dips_table(dips: pd.DataFrame) -> str:
    columns = ["source", "start_step", "bottom_step", "end_step", "peak", "bottom", "depth", "recovered"]
    shown = dips[columns].assign(status=plots.dip_status(dips))
    return "<details><summary>Dips</summary>" + _table(
        shown, {c: _pct for c in ("peak", "bottom", "depth")}) + "</details>"


def _lead_lag_parts(ll: LeadLagResult | None, plot: _Plots) -> list[str]:
    if ll is None:
        return []
    parts = ["<h3>Lead-lag of gradient spikes</h3>", f"<p>{esc(ll.summary)}</p>",
             _table(ll.per_layer, {"frac_first_leads": _pct})]
    if len(ll.matches):
        parts.append(plot(plots.lag_histogram(ll.matches)))
    return parts


# ------------------------------------------------------------------ several runs

def _comparison_section(runs, analyses, plot: _Plots) -> str:
    overview = pd.DataFrame([{"run": r.name, **_key_values(r)} for r in runs])
    verdicts = "".join(f"<li><b>{esc(r.name)}</b>: {esc(_verdict(r, a))}</li>"
                       for r, a in zip(runs, analyses))
    compared = compare_runs(runs)
    parts = ["<section><h2>Comparison</h2>", _table(overview[OVERVIEW_COLUMNS]),
             f'<ul class="verdict">{verdicts}</ul>', "<h3>Runs compared</h3>",
             _table(compared, {c: _pct for c in ("final_top1", "best_top1", "deepest_dip",
                                                 "first_leads_frac")})]
    grid = _figure6(compared)
    if grid is not None:
        parts += ["<h3>Final kNN top-1, variant × learning rate (Figure 6 form)</h3>", grid]
    for source in sorted({s for r in runs for s in knn_curves(r.knn)}):
        parts.append(plot(plots.overlay_knn(runs, source=source)))
    if any(len(a.grad_norms) for a in analyses):
        parts.append(plot(plots.overlay_first_layer(runs)))
    return "\n".join(parts + ["</section>"])


def _figure6(compared: pd.DataFrame) -> str | None:
    """figure6_table as HTML when the runs form a grid of >= 2 variants x >= 2 lrs."""
    variant, lr = "model.patch_proj", "optim.base_lr"
    if not {variant, lr} <= set(compared.columns) or compared["final_top1"].isna().all():
        return None
    if compared[variant].nunique() < 2 or compared[lr].nunique() < 2:
        return None
    values = compared.assign(final_top1=pd.to_numeric(compared["final_top1"], errors="coerce"))
    table = figure6_table(values, variant=variant, lr=lr) * 100
    return table.to_html(escape=True, border=0, na_rep="–", float_format=lambda v: f"{v:.2f}")
