"""Plotly figures of a run's tables, reusable in Jupyter (no torch here).

Every function takes DataFrames (or `Run` objects for the overlays) and returns a
`plotly.graph_objects.Figure`. Long curves are decimated for display to about `max_points`
points per trace (per-bucket min and max), always keeping the steps of detected dips and
spikes, so a 375,000-step run stays responsive and every event stays visible. Hovers show
names in full and numbers to 3 significant digits. Several runs are grouped by setting
(`run_styles`): one colour per setting, one line style per seed.
"""
from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from analysis import SpikeRule, binomial_noise, config_table, find_spikes, knn_curves, running_ratio, varied_keys
from analysis.layers import BLOCK, last_block, logged_first_layer
from analysis.spikes import valid_values

MAX_POINTS = 4000
MAX_HEATMAP_COLUMNS = 1500
MAX_MARKERS = 100  # a curve with at most this many points also gets a marker per point
DIP_COLOR = "rgba(214, 39, 40, {alpha})"
# The colour-blind-safe qualitative palette of plotly ("Safe", 11 colours), darkest first so
# that a few settings read well on white.
PALETTE = [qualitative.Safe[i] for i in (4, 1, 3, 0, 8, 6, 2, 5, 7, 9, 10)]
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
LAYOUT = dict(template="plotly_white", hoverlabel=dict(namelength=-1), margin=dict(t=60))
# representation collapse (knn table), a panel each below the kNN curve: (column, axis title)
REPRESENTATION_ROWS = [("effective_rank", "effective rank"), ("feature_std", "feature std")]
LINEAR_COLORS = {"official": "#222222", "fast": "#8c564b"}  # linear-probe markers per protocol


def label(text) -> str:
    """A run name, layer or config value made safe as plotly text (shown literally)."""
    return html.escape(str(text), quote=False)


def translucent(color: str, alpha: float) -> str:
    """An `rgb(r, g, b)` colour of the palette as `rgba(r, g, b, alpha)`."""
    return color.replace("rgb(", "rgba(").replace(")", f", {alpha})")


def log_ticks(values, max_ticks: int = 7) -> dict:
    """Tick values and labels of a log axis over `values`: 1-2-5 steps (0.1, 0.2, 0.5, 1, 2,
    ...) written out in full, or only the powers of ten when those would be more than
    `max_ticks`; {} when there is no positive value. plotly's own log ticks label 20 and 50
    as "2" and "5", which reads wrong in a short panel."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values) & (values > 0)]
    if not len(values):
        return {}
    low, high = np.floor(np.log10(values.min())), np.ceil(np.log10(values.max()))
    decades = 10.0 ** np.arange(low, high + 1)
    ticks = [t for t in np.outer(decades, [1, 2, 5]).ravel() if values.min() / 1.1 <= t <= values.max() * 1.1]
    if len(ticks) > max_ticks:
        ticks = [t for t in decades if values.min() / 10 < t <= values.max() * 10]
    return dict(tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])


def decimate(series: pd.Series, max_points: int = MAX_POINTS, keep=()) -> pd.Series:
    """Display subset of a step-indexed series: per-bucket min and max, both ends, `keep` steps.

    A series of n > max_points points is cut into max_points / 2 buckets of consecutive
    points; the smallest and the largest point of each bucket are kept, so spikes and dips
    survive. Steps listed in `keep` that are in the index are always kept.
    """
    n = len(series)
    if n <= max_points:
        return series
    y = series.to_numpy(dtype=float)
    buckets = max(max_points // 2, 1)
    size = -(-n // buckets)
    pad = buckets * size - n
    low = np.concatenate([np.where(np.isnan(y), np.inf, y), np.full(pad, np.inf)])
    high = np.concatenate([np.where(np.isnan(y), -np.inf, y), np.full(pad, -np.inf)])
    start = np.arange(buckets) * size
    kept = series.index.get_indexer(pd.Index(keep).unique()) if len(keep) else np.array([], int)
    positions = np.concatenate([start + low.reshape(buckets, size).argmin(axis=1),
                                start + high.reshape(buckets, size).argmax(axis=1),
                                [0, n - 1], kept[kept >= 0]])
    return series.iloc[np.unique(positions[positions < n])]


def bucket_max(wide: pd.DataFrame, max_rows: int = MAX_HEATMAP_COLUMNS) -> pd.DataFrame:
    """Rows of `wide` merged into at most `max_rows` buckets of consecutive steps, by max.

    The index of each bucket is its first step; the max keeps every spike visible.
    """
    if len(wide) <= max_rows:
        return wide
    size = -(-len(wide) // max_rows)
    bucket = np.arange(len(wide)) // size
    merged = wide.groupby(bucket).max()
    merged.index = wide.index[::size]
    return merged


def default_layers(layers) -> list[str]:
    """First logged layer, middle and last transformer block (the paper's "last layers", not
    the heads; `analysis.layers.last_block`); without `blocks.N` columns the middle and last
    column. Fewer when fewer layers."""
    layers = [str(layer) for layer in layers]
    if not layers:
        return []
    blocks = [layer for layer in layers if BLOCK.fullmatch(layer)] or layers
    return list(dict.fromkeys([layers[0], blocks[len(blocks) // 2], last_block(None, layers)]))


# ------------------------------------------------------------------ grouping runs by setting

def setting_labels(runs, seed_key="seed", keys=None) -> list[str]:
    """One label per run naming the config values that differ between the runs, seed
    and `analysis.RUNTIME_KEYS` excluded, so that the seeds of one setting share a label ("all"
    when nothing differs).

    keys: the dotted config keys to name instead (e.g. ["optim.batch_size", "optim.base_lr"]),
    for sweeps whose settings also differ in keys that follow from these.
    """
    config = config_table(runs)
    varied = varied_keys(config, exclude=[seed_key]) if keys is None else list(keys)
    if unknown := [k for k in varied if k not in config.columns]:
        raise ValueError(f"no run's config has {', '.join(unknown)}")
    return [", ".join(f"{c.split('.')[-1]}={row[c]}" for c in varied) or "all"
            for _, row in config.iterrows()]


@dataclass(frozen=True)
class RunStyle:
    """How one run is drawn among several: its setting (label), colour and seed index."""

    setting: str
    color: str
    seed_index: int

    @property
    def dash(self) -> str:
        return DASHES[self.seed_index % len(DASHES)]


def run_styles(runs, keys=None) -> list[RunStyle]:
    """One `RunStyle` per run: a palette colour per setting (`setting_labels`, in order of
    first appearance, cycling after 11), a line style per seed within the setting."""
    labels = setting_labels(runs, keys=keys)
    settings = list(dict.fromkeys(labels))
    seen: dict[str, int] = {}
    styles = []
    for name in labels:
        styles.append(RunStyle(name, PALETTE[settings.index(name) % len(PALETTE)], seen.get(name, 0)))
        seen[name] = seen.get(name, 0) + 1
    return styles


def steps_per_epoch(run) -> float | None:
    """Optimizer steps per epoch of a run, read off its kNN rows (step + 1 over epoch)."""
    rows = run.knn.dropna(subset=["epoch"]) if "epoch" in run.knn else run.knn.iloc[:0]
    rows = rows[rows["epoch"] > 0]
    return None if rows.empty else float(((rows["step"] + 1) / rows["epoch"]).median())


def seed_bands(runs, source="val", x=None, keys=None) -> tuple[str, dict[str, pd.DataFrame]]:
    """kNN top-1 (%) of each setting over its seeds: (x, {setting: frame}) with columns mean,
    std (sample, 0 for one seed) and n, indexed by x, at the points every seed evaluated.

    x: "step" or "epoch"; default "epoch" when the runs' steps per epoch differ (batch
    sizes), so that their bands line up, else "step". keys: see `setting_labels`.
    """
    if x is None:
        x = "epoch" if len({round(n) for n in map(steps_per_epoch, runs) if n}) > 1 else "step"
    if x not in ("step", "epoch"):
        raise ValueError(f"x must be 'step' or 'epoch', not {x!r}")
    curves: dict[str, list] = {}
    for run, name in zip(runs, setting_labels(runs, keys=keys)):
        curve = knn_curves(run.knn).get(source)
        if curve is not None:
            top1 = curve["top1"] * 100
            if x == "epoch":
                top1.index = curve["epoch"].round(6)
            curves.setdefault(name, []).append(top1)
    bands = {}
    for name, members in curves.items():
        table = pd.concat(members, axis=1, join="inner")
        bands[name] = pd.DataFrame({"mean": table.mean(axis=1), "std": table.std(axis=1).fillna(0),
                                    "n": table.shape[1]})
    return x, bands


# ------------------------------------------------------------------ one run

def loss_figure(steps: pd.DataFrame, max_points: int = MAX_POINTS) -> go.Figure:
    """Loss, learning rate and key-encoder momentum vs step, one panel each, shared x."""
    columns = [c for c in ("loss", "lr", "momentum") if c in steps]
    fig = make_subplots(rows=len(columns) or 1, cols=1, shared_xaxes=True,
                        vertical_spacing=0.06, subplot_titles=columns)
    series = steps.set_index("step")
    for row, column in enumerate(columns, start=1):
        values = decimate(series[column].astype(float), max_points)
        fig.add_trace(go.Scatter(x=values.index, y=values.to_numpy(), name=column, mode="lines",
                                 showlegend=False, line=dict(color=PALETTE[0], width=1.2),
                                 hovertemplate="step %{x}<br>%{y:.3g}"), row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(columns) or 1, col=1)
    fig.update_layout(**LAYOUT)
    fig.update_layout(height=220 * max(len(columns), 1) + 60, title="Training curves", margin=dict(t=70))
    return fig


def _dip_steps(dips) -> list:
    if dips is None or dips.empty:
        return []
    return pd.unique(dips[["start_step", "bottom_step", "end_step"]].to_numpy().ravel()).tolist()


def dip_status(dips: pd.DataFrame) -> np.ndarray:
    """confirmed | not confirmed | unchecked, from the nullable `confirmed` column."""
    confirmed = dips["confirmed"] if "confirmed" in dips else pd.Series(pd.NA, dips.index)
    confirmed = confirmed.astype("boolean")
    return np.where(confirmed.isna(), "unchecked",
                    np.where(confirmed.fillna(False), "confirmed", "not confirmed"))


def _knn_traces(rows: pd.DataFrame, name: str, color: str, max_points: int, keep=(), dash="solid",
                group=None, show_band=True) -> list[go.Scatter]:
    """One source's top-1 curve (%) with its binomial +-2 sigma band (from n_queries).

    The band is a filled area between curve +- 2 sigma; a lone evaluation gets an error bar
    instead; curves of at most MAX_MARKERS points get a marker per point."""
    curve = decimate(rows["top1"], max_points, keep)
    n = rows["n_queries"].reindex(curve.index) if "n_queries" in rows else pd.Series(np.nan, curve.index)
    two_sigma = 2 * 100 * binomial_noise(curve, n.astype(float))
    x, y = curve.index.to_numpy(), 100 * curve.to_numpy()
    group = group or name
    markers = len(curve) <= MAX_MARKERS
    traces = []
    if show_band and len(curve) > 1 and two_sigma.notna().any():
        upper, lower = y + two_sigma.fillna(0).to_numpy(), y - two_sigma.fillna(0).to_numpy()
        traces.append(go.Scatter(x=np.concatenate([x, x[::-1]]), y=np.concatenate([upper, lower[::-1]]),
                                 mode="lines", fill="toself", fillcolor=translucent(color, 0.18), line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=group, name=f"{name} ±2σ"))
    traces.append(go.Scatter(
        x=x, y=y, name=name, legendgroup=group, mode="lines+markers" if markers else "lines",
        line=dict(color=color, width=1.5, dash=dash), marker=dict(size=5, color=color),
        error_y=dict(type="data", array=two_sigma.to_numpy(), color=color, visible=len(curve) == 1),
        customdata=two_sigma.to_numpy(),
        hovertemplate="step %{x}<br>top-1 %{y:.3g}% ± %{customdata:.3g} (2σ)"))
    return traces


def knn_figure(knn: pd.DataFrame, dips: pd.DataFrame | None = None, max_points: int = MAX_POINTS,
               linear: pd.DataFrame | None = None) -> go.Figure:
    """kNN top-1 vs step, one line per source (queue, val) with the binomial +-2 sigma band of
    each evaluation (`analysis.binomial_noise` with the row's n_queries), detected dips shaded.

    `dips` is a frame as from `analysis.find_knn_dips` (start_step, bottom_step, end_step,
    bottom, depth, depth_noise, confirmed); confirmed dips are shaded darker than the others.
    `linear` is a frame as from `analysis.linear_curve` (step, protocol, top1, top5, n_val):
    each protocol's linear-probe top-1 as diamonds with their +-2 sigma bars, on the same axes
    (both are top-1 in %). When the kNN rows have `effective_rank` / `feature_std` (the
    representation-collapse signals of the evaluated features), each gets a panel below on
    the same step axis, so a fall in rank lines up with the dip above it.
    """
    collapse = [(column, title) for column, title in REPRESENTATION_ROWS
                if column in knn and knn[column].notna().any()]
    fig = make_subplots(rows=1 + len(collapse), cols=1, shared_xaxes=True, vertical_spacing=0.05,
                        row_heights=[3] + [1] * len(collapse))
    keep = _dip_steps(dips)
    colors = {}
    for i, (source, rows) in enumerate(knn_curves(knn).items()):
        colors[source] = PALETTE[i % len(PALETTE)]
        fig.add_traces(_knn_traces(rows, label(source), colors[source], max_points, keep), rows=1, cols=1)
    if dips is not None and not dips.empty:
        status = dip_status(dips)
        fig.update_layout(shapes=[  # one update: add_vrect per dip is slow for many dips
            dict(type="rect", xref="x", yref="paper", x0=start, x1=end, y0=0, y1=1, line_width=0,
                 layer="below", fillcolor=DIP_COLOR.format(alpha=0.25 if state == "confirmed" else 0.08))
            for start, end, state in zip(dips["start_step"], dips["end_step"], status)])
        sources = dips["source"] if "source" in dips else pd.Series("", dips.index)
        noise = dips["depth_noise"] if "depth_noise" in dips else pd.Series(np.nan, dips.index)
        fig.add_trace(go.Scatter(
            x=dips["bottom_step"], y=dips["bottom"] * 100, mode="markers", name="dip bottom",
            marker=dict(symbol="triangle-down", size=10, color=DIP_COLOR.format(alpha=1)),
            customdata=np.column_stack([dips["depth"] * 100, noise.astype(float), status,
                                        [label(s) for s in sources]]),
            hovertemplate="%{customdata[3]} dip, bottom at step %{x}<br>top-1 %{y:.3g}%"
                          "<br>depth %{customdata[0]:.3g} points = %{customdata[1]:.3g} noise units"
                          "<br>%{customdata[2]}"), row=1, col=1)
    curve = linear if linear is not None and len(linear) else pd.DataFrame(columns=["protocol"])
    for protocol, rows in curve.groupby("protocol", sort=False):
        color = LINEAR_COLORS.get(protocol, "#777777")
        two_sigma = 200 * binomial_noise(rows["top1"], rows["n_val"].astype(float))
        fig.add_trace(go.Scatter(
            x=rows["step"], y=100 * rows["top1"], mode="markers", name=f"linear probe ({label(protocol)})",
            marker=dict(symbol="diamond", size=10, color=color, line=dict(color="white", width=1)),
            error_y=dict(type="data", array=two_sigma.to_numpy(), color=color),
            customdata=np.column_stack([two_sigma, 100 * rows["top5"], rows["n_val"]]),
            hovertemplate=f"linear probe ({label(protocol)}) of the step-%{{x}} checkpoint<br>top-1 %{{y:.3g}}% "
                          "± %{customdata[0]:.3g} (2σ), top-5 %{customdata[1]:.3g}%<br>%{customdata[2]} images"),
            row=1, col=1)
    for row, (column, title) in enumerate(collapse, start=2):
        for source, rows in knn.dropna(subset=[column]).groupby("source", sort=True):
            series = decimate(rows.groupby("step")[column].last(), max_points)
            fig.add_trace(go.Scatter(
                x=series.index, y=series.to_numpy(), mode="lines+markers" if len(series) <= MAX_MARKERS else "lines",
                name=f"{label(source)} {title}", legendgroup=label(source), showlegend=False,
                line=dict(color=colors.get(source, PALETTE[0]), width=1.2), marker=dict(size=4),
                hovertemplate=f"{label(source)}, step %{{x}}<br>{title} %{{y:.3g}}"), row=row, col=1)
        fig.update_yaxes(title_text=title, row=row, col=1)
    fig.update_layout(**LAYOUT)
    fig.update_xaxes(title_text="step", row=1 + len(collapse), col=1)
    fig.update_yaxes(title_text="top-1 (%)", row=1, col=1)
    fig.update_layout(title="kNN top-1 (bands: ±2σ binomial noise of each evaluation; dips shaded, "
                            "darker: confirmed by the other source)"
                            + ("; linear probes: diamonds" if len(curve) else "")
                            + ("; below: the evaluated features' effective rank and std" if collapse else ""),
                      title_font_size=14, height=450 + 170 * len(collapse))
    return fig


def grad_heatmap(grad_norms: pd.DataFrame, max_columns: int = MAX_HEATMAP_COLUMNS) -> go.Figure:
    """Per-layer gradient norm, layer x step, log colour scale (per-bucket max of the steps)."""
    merged = bucket_max(grad_norms, max_columns)
    values = merged.to_numpy(dtype=float).T
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.where(values > 0, np.log10(values), np.nan)
    finite = z[np.isfinite(z)]
    ticks = np.arange(np.floor(finite.min()), np.ceil(finite.max()) + 1) if finite.size else []
    fig = go.Figure(go.Heatmap(
        x=merged.index, y=[label(c) for c in merged.columns], z=z, customdata=values,
        colorscale="Viridis", hovertemplate="%{y}<br>step %{x}<br>‖g‖ %{customdata:.3g}<extra></extra>",
        colorbar=dict(title="‖g‖", tickvals=ticks, ticktext=[f"1e{int(t)}" for t in ticks])))
    fig.update_layout(**LAYOUT)
    fig.update_layout(title="Per-layer gradient norm (log colour, max per step bucket)",
                      xaxis_title="step", yaxis=dict(autorange="reversed", type="category"),
                      height=max(300, 22 * len(merged.columns) + 150))
    return fig


def relative_grad_figure(grad_norms: pd.DataFrame, layers=None, spikes: pd.DataFrame | None = None,
                         max_points: int = MAX_POINTS, rule=None) -> go.Figure:
    """Gradient norm of a few layers, each over its causal running median, every spike marked.

    The form of the paper's Figure 4 (first vs last layer). `layers` defaults to the first,
    a middle and the last transformer block. `spikes` is a frame with layer, step, peak_step
    and ratio columns (as from `analysis.find_spikes`); default: the events `rule` finds in
    the plotted layers. The peak of every event of every plotted layer is marked. `rule`
    (a `SpikeRule` or its text, default `DEFAULT_RULE`) also sets the running median's
    window, and its ratio thresholds are drawn as dotted lines.
    """
    rule = SpikeRule.parse(rule)
    layers = [str(layer) for layer in (layers or default_layers(grad_norms.columns))]
    if spikes is None:
        spikes = find_spikes(grad_norms[layers], rule)
    fig = go.Figure()
    relative = running_ratio(grad_norms[layers], rule.window)
    for i, layer in enumerate(layers):
        line_color = PALETTE[i % len(PALETTE)]
        mine = spikes[spikes["layer"].astype(str) == layer]
        values = relative[layer].dropna()
        line = decimate(values, max_points, [*mine["step"], *mine["peak_step"]])
        fig.add_trace(go.Scatter(x=line.index, y=line.to_numpy(), mode="lines", name=label(layer),
                                 legendgroup=label(layer), line=dict(color=line_color, width=1.2),
                                 hovertemplate="step %{x}<br>%{y:.3g}x running median"))
        if len(mine):
            marked = values.reindex(mine["peak_step"])
            fig.add_trace(go.Scatter(
                x=marked.index, y=marked.to_numpy(), mode="markers", name=f"{label(layer)} spikes ({len(mine)})",
                legendgroup=label(layer), marker=dict(symbol="x", size=9, color=line_color),
                customdata=np.column_stack([mine["step"], mine["end_step"]]),
                hovertemplate="spike peak at step %{x}: %{y:.3g}x running median"
                              "<br>flagged steps %{customdata[0]}-%{customdata[1]}"))
    warm = [valid_values(grad_norms[layer]).index[rule.warmup - 1] for layer in layers
            if 0 < rule.warmup <= len(valid_values(grad_norms[layer]))]
    if warm:
        fig.add_vrect(x0=grad_norms.index.min(), x1=max(warm), fillcolor="rgba(0, 0, 0, 0.06)", line_width=0,
                      layer="below", annotation_text=f"warm-up ({rule.warmup} values, never flagged)",
                      annotation_position="top left", annotation_font_size=11)
    steps = grad_norms.index
    for tests in rule.alternatives:
        ratio = [t.threshold for t in tests if t.method == "ratio"]
        if ratio and len(steps):
            fig.add_trace(go.Scatter(
                x=[steps.min(), steps.max()], y=[ratio[0]] * 2, mode="lines", hoverinfo="skip",
                name=f"rule: {'+'.join(map(str, tests))}", line=dict(color="#777", width=1, dash="dot")))
    fig.update_layout(**LAYOUT)
    fig.update_layout(title=f"Gradient norm over its running median of {rule.window} values (Figure 4 form); "
                            f"x: spikes under {rule}", title_font_size=14,
                      xaxis_title="step", yaxis=dict(title="‖g‖ / running median", type="log", dtick=1))
    return fig


def lag_histogram(matches: pd.DataFrame, max_lag: float | None = None) -> go.Figure:
    """Histogram of lags (steps) from a first-layer spike to its matched later-layer spike:
    one bar per whole step, centred on it, over -max_lag..max_lag (the matching window)."""
    lags = matches["lag"].astype(float)
    reach = max_lag if max_lag is not None else (lags.abs().max() if len(lags) else 1.0)
    reach = float(np.ceil(reach))
    highest = int(lags.round().value_counts().max()) if len(lags) else 1
    fig = go.Figure(go.Histogram(x=lags, xbins=dict(start=-reach - 0.5, end=reach + 0.5, size=1), name="lag",
                                 marker_color=PALETTE[0],
                                 hovertemplate="lag %{x} steps<br>%{y} matched pairs<extra></extra>"))
    fig.add_vline(x=0, line=dict(color="#777", width=1, dash="dot"), layer="below")
    fig.update_layout(**LAYOUT)
    fig.update_layout(title="Lag of matched spikes (later layer − first layer; > 0: the first layer came first)",
                      xaxis=dict(title="lag (steps)", range=[-reach - 0.5, reach + 0.5],
                                 dtick=1 if reach <= 15 else None),
                      yaxis=dict(title="matched pairs", dtick=1 if highest <= 10 else None),
                      bargap=0.05, title_font_size=14)
    return fig


# ------------------------------------------------------------------ several runs

def _runs_layout(fig: go.Figure, title: str, **layout) -> go.Figure:
    """Common layout of the several-run figures; tall enough that the legend (one row per
    run, one title per setting) never scrolls."""
    entries = sum(1 for t in fig.data if t.showlegend is not False)
    groups = len({t.legendgroup for t in fig.data if t.legendgrouptitle.text})
    fig.update_layout(**LAYOUT)
    fig.update_layout(title=title, title_font_size=14, legend=dict(groupclick="toggleitem"),
                      height=max(450, 20 * entries + 32 * groups + 140), **layout)
    return fig


def overlay_knn(runs, source: str = "queue", max_points: int = MAX_POINTS, styles=None) -> go.Figure:
    """kNN top-1 of several runs on one axis (one `source`): colour per setting, line style
    per seed (`run_styles`), the legend grouped by setting."""
    fig = go.Figure()
    styles = styles or run_styles(runs)
    for run, style in zip(runs, styles):
        curves = knn_curves(run.knn)
        if source in curves:
            for trace in _knn_traces(curves[source], label(run.name), style.color, max_points,
                                     dash=style.dash, group=label(style.setting), show_band=False):
                fig.add_trace(trace.update(legendgrouptitle_text=label(style.setting)))
    return _runs_layout(fig, f"kNN top-1 ({label(source)}) of each run: colour = setting, line style = seed",
                        xaxis_title="step", yaxis_title="top-1 (%)")


def seed_band_figure(runs, source="val", x=None, keys=None, styles=None) -> go.Figure:
    """kNN top-1 of each setting: mean over its seeds as a line, +-1 sd as a band (see
    `seed_bands`), in the setting's colour."""
    x, bands = seed_bands(runs, source, x, keys)
    colors = {s.setting: s.color for s in (styles or run_styles(runs, keys=keys))}
    fig = go.Figure()
    for name, band in bands.items():
        color, xs = colors[name], band.index.to_numpy()
        fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]),
                                 y=np.concatenate([band["mean"] + band["std"], (band["mean"] - band["std"])[::-1]]),
                                 mode="lines", fill="toself", fillcolor=translucent(color, 0.2), line=dict(width=0),
                                 hoverinfo="skip", showlegend=False, legendgroup=label(name)))
        fig.add_trace(go.Scatter(
            x=xs, y=band["mean"], name=f"{label(name)} (n={int(band['n'].iloc[0])})", legendgroup=label(name),
            mode="lines+markers" if len(band) <= MAX_MARKERS else "lines",
            line=dict(color=color, width=2), marker=dict(size=5), customdata=band["std"],
            hovertemplate=f"{x} %{{x:.3g}}<br>mean top-1 %{{y:.3g}}% ± %{{customdata:.3g}} (1 sd over seeds)"))
    return _runs_layout(fig, f"kNN top-1 ({label(source)}) per setting: mean and ±1 sd over seeds",
                        xaxis_title=x, yaxis_title="top-1 (%)")


def overlay_first_layer(runs, max_points: int = MAX_POINTS, styles=None) -> go.Figure:
    """First-layer gradient norm of several runs, log y (`first_layer` of each run: the patch
    projection, or the first logged layer of a run whose projection is frozen, named in the
    legend and the title)."""
    fig = go.Figure()
    styles = styles or run_styles(runs)
    shown, stand_ins = set(), set()
    for run, style in zip(runs, styles):
        wide = run.grad_norms() if len(run.layers) else pd.DataFrame()
        layer = logged_first_layer(run.meta, wide.columns)
        if layer is None:
            continue
        shown.add(layer)
        if layer not in ((run.meta or {}).get("first_layer"), "patch_embed"):
            stand_ins.add(layer)
        curve = decimate(wide[layer].dropna(), max_points)
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), mode="lines",
                                 name=f"{label(run.name)} ({label(layer)})", legendgroup=label(style.setting),
                                 legendgrouptitle_text=label(style.setting),
                                 line=dict(color=style.color, dash=style.dash, width=1.2),
                                 hovertemplate="step %{x}<br>‖g‖ %{y:.3g}"))
    title = "First-layer gradient norm of each run"
    if len(shown) == 1 and not stand_ins:
        title += f" ({label(next(iter(shown)))})"
    elif stand_ins:
        title += (f" (layer in brackets; {', '.join(map(label, sorted(stand_ins)))}: the first logged layer "
                  "of a run whose patch projection is frozen, so not logged)")
    return _runs_layout(fig, title, xaxis_title="step", yaxis=dict(title="‖g‖", type="log", dtick=1))
