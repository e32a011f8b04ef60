"""Plotly figures of a run's tables, reusable in Jupyter (no torch here).

Every function takes DataFrames (or `Run` objects for the overlays) and returns a
`plotly.graph_objects.Figure`. Long curves are decimated for display to about `max_points`
points per trace (per-bucket min and max), always keeping the steps of detected dips and
spikes, so a 375,000-step run stays responsive and every event stays visible.
"""
from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis import knn_curves, running_ratio

MAX_POINTS = 4000
MAX_HEATMAP_COLUMNS = 1500
DIP_COLOR = "rgba(214, 39, 40, {alpha})"


def label(text) -> str:
    """A run name, layer or config value made safe as plotly text (shown literally)."""
    return html.escape(str(text), quote=False)


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
    """First layer, middle and last transformer block (the paper's "last layers", not the
    heads); without `blocks.N` columns the middle and last column. Fewer when fewer layers."""
    layers = [str(layer) for layer in layers]
    if not layers:
        return []
    blocks = [layer for layer in layers if layer.startswith("blocks.")] or layers
    return list(dict.fromkeys([layers[0], blocks[len(blocks) // 2], blocks[-1]]))


def loss_figure(steps: pd.DataFrame, max_points: int = MAX_POINTS) -> go.Figure:
    """Loss, learning rate and key-encoder momentum vs step, one panel each, shared x."""
    columns = [c for c in ("loss", "lr", "momentum") if c in steps]
    fig = make_subplots(rows=len(columns) or 1, cols=1, shared_xaxes=True,
                        vertical_spacing=0.06, subplot_titles=columns)
    series = steps.set_index("step")
    for row, column in enumerate(columns, start=1):
        values = decimate(series[column].astype(float), max_points)
        fig.add_trace(go.Scatter(x=values.index, y=values.to_numpy(), name=column,
                                   mode="lines", showlegend=False), row=row, col=1)
    fig.update_xaxes(title_text="step", row=len(columns) or 1, col=1)
    fig.update_layout(height=220 * max(len(columns), 1) + 60, title="Training curves",
                      margin=dict(t=70))
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


def knn_figure(knn: pd.DataFrame, dips: pd.DataFrame | None = None,
               max_points: int = MAX_POINTS) -> go.Figure:
    """kNN top-1 vs step, one line per source (queue, val), detected dips shaded.

    `dips` is a frame as from `analysis.find_knn_dips` (start_step, bottom_step, end_step,
    bottom, depth, confirmed); confirmed dips are shaded darker than the others.
    """
    fig = go.Figure()
    keep = _dip_steps(dips)
    for source, rows in knn_curves(knn).items():
        curve = decimate(rows["top1"] * 100, max_points, keep)
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), name=label(source),
                                 mode="lines" if source == "queue" else "lines+markers"))
    if dips is not None and not dips.empty:
        status = dip_status(dips)
        fig.update_layout(shapes=[  # one update: add_vrect per dip is slow for many dips
            dict(type="rect", xref="x", yref="paper", x0=start, x1=end, y0=0, y1=1, line_width=0,
                 layer="below", fillcolor=DIP_COLOR.format(alpha=0.25 if state == "confirmed" else 0.08))
            for start, end, state in zip(dips["start_step"], dips["end_step"], status)])
        sources = dips["source"] if "source" in dips else pd.Series("", dips.index)
        fig.add_trace(go.Scatter(
            x=dips["bottom_step"], y=dips["bottom"] * 100, mode="markers", name="dip bottom",
            marker=dict(symbol="triangle-down", size=9, color=DIP_COLOR.format(alpha=1)),
            customdata=np.column_stack([(dips["depth"] * 100).round(2), status,
                                        [label(s) for s in sources]]),
            hovertemplate="%{customdata[2]} dip, step %{x}<br>top-1 %{y:.2f}%"
                          "<br>depth %{customdata[0]} pts<br>%{customdata[1]}<extra></extra>"))
    fig.update_layout(title="kNN top-1 (dips shaded; darker: confirmed by the other source)",
                      xaxis_title="step", yaxis_title="top-1 (%)")
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
    fig.update_layout(title="Per-layer gradient norm (log colour, max per step bucket)",
                      xaxis_title="step", yaxis=dict(autorange="reversed", type="category"),
                      height=max(300, 22 * len(merged.columns) + 150))
    return fig


def relative_grad_figure(grad_norms: pd.DataFrame, layers=None, spikes: pd.DataFrame | None = None,
                         max_points: int = MAX_POINTS) -> go.Figure:
    """Gradient norm of a few layers, each over its causal running median, spikes marked.

    The form of the paper's Figure 4 (first vs last layer). `layers` defaults to the first,
    a middle and the last layer; `spikes` is a frame with layer, step and peak_step columns
    (as from `analysis.find_spikes`): the peak of each spike is marked.
    """
    fig = go.Figure()
    for layer in layers or default_layers(grad_norms.columns):
        relative = running_ratio(grad_norms[layer]).dropna()
        mine = (pd.DataFrame(columns=["step", "peak_step"]) if spikes is None
                else spikes[spikes["layer"].astype(str) == layer])
        line = decimate(relative, max_points, [*mine["step"], *mine["peak_step"]])
        fig.add_trace(go.Scatter(x=line.index, y=line.to_numpy(), mode="lines", name=label(layer),
                                 legendgroup=label(layer)))
        if len(mine):
            marked = relative.reindex(mine["peak_step"])
            fig.add_trace(go.Scatter(x=marked.index, y=marked.to_numpy(), mode="markers",
                                     name=f"{label(layer)} spikes", legendgroup=label(layer),
                                     marker=dict(symbol="x", size=8)))
    fig.update_layout(title="Gradient norm over its running median (Figure 4 form)",
                      xaxis_title="step", yaxis=dict(title="‖g‖ / running median", type="log"))
    return fig


def lag_histogram(matches: pd.DataFrame) -> go.Figure:
    """Histogram of lags (steps) from a first-layer spike to its matched later-layer spike."""
    fig = go.Figure(go.Histogram(x=matches["lag"], xbins=dict(size=1), name="lag"))
    fig.update_layout(title="Lag of matched spikes (later layer − first layer)",
                      xaxis_title="lag (steps)", yaxis_title="matches", bargap=0.05)
    return fig


def overlay_knn(runs, source: str = "queue", max_points: int = MAX_POINTS) -> go.Figure:
    """kNN top-1 of several runs on one axis (one `source`)."""
    fig = go.Figure()
    for run in runs:
        curves = knn_curves(run.knn)
        if source not in curves:
            continue
        curve = decimate(curves[source]["top1"] * 100, max_points)
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), mode="lines",
                                   name=label(run.name)))
    fig.update_layout(title=f"kNN top-1 ({source}) of each run", xaxis_title="step",
                      yaxis_title="top-1 (%)")
    return fig


def overlay_first_layer(runs, max_points: int = MAX_POINTS) -> go.Figure:
    """First-layer (patch projection) gradient norm of several runs, log y."""
    fig = go.Figure()
    for run in runs:
        wide = run.grad_norms()
        if wide.empty:
            continue
        curve = decimate(wide.iloc[:, 0].dropna(), max_points)
        fig.add_trace(go.Scatter(x=curve.index, y=curve.to_numpy(), mode="lines",
                                   name=f"{label(run.name)} ({label(wide.columns[0])})"))
    fig.update_layout(title="First-layer gradient norm of each run", xaxis_title="step",
                      yaxis=dict(title="‖g‖", type="log"))
    return fig
