"""Report sections of the mechanism probes and of the replays (plotly figures and tables; no torch).

`optimizer_state_section(run)`, `attention_section(run)` and `replay_sections(run)` return
`Section`s (title, figures, tables, note) for the report to render, or None / [] when the
run has no such data (runs from before the probes, runs without replays). The figures come
from the `*_figure` functions, which also work alone in Jupyter:

- "Optimizer state": the first layer and the last block side by side, one row per column of
  trainer/probes_optim.py (adam_freshness, adam_small_v_frac, update_rms_over_lr,
  update_cos_neg_grad, lars_trust_ratio when LARS), gradient-spike onsets of that layer marked.
- "Attention": the first and the last block side by side: entropy (mean and min over heads)
  and the largest logit.
- "Replay at step S": per replay (the original, the unchanged replay, each mitigation) the
  largest gradient-norm ratio over the running median of each layer in the window, with the
  spike count, and the kNN top-1 over the same steps. A replay's ratios use the original's
  history before the replay as their baseline, so every row is on the original's scale.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analysis import SpikeRule, find_spikes, knn_curves, running_ratio
from analysis.layers import last_block, logged_first_layer
from stabilitylab.plots import LAYOUT, MAX_POINTS, PALETTE, decimate, label, log_ticks
from stabilitylab.run import pivot_layers

OPTIMIZER_ROWS = [  # (column, axis title, log axis)
    ("adam_freshness", "g² / v̂", True),
    ("adam_small_v_frac", "share √v̂ < 10 eps", False),
    ("update_rms_over_lr", "update RMS / lr", True),
    ("update_cos_neg_grad", "cos(update, −g)", False),
    ("lars_trust_ratio", "LARS trust ratio", True),
]
SPIKE_COLOR = "rgba(214, 39, 40, 0.8)"


@dataclass
class Section:
    """One report section: a title, figures, display-ready tables and a note (plain text)."""

    title: str
    figures: list[go.Figure] = field(default_factory=list)
    tables: list[pd.DataFrame] = field(default_factory=list)
    note: str = ""


def first_and_last(run, layers) -> tuple[str, str]:
    """The layers to set side by side: the first layer when logged and the last block
    (`analysis.layers`)."""
    return logged_first_layer(run.meta, layers), last_block(run.meta, layers)


def _long(table: pd.DataFrame, layers) -> pd.DataFrame:
    return table[table["layer"].astype(str).isin(layers)]


def _spike_steps(run, layer: str, rule) -> list[int]:
    grad = pivot_layers(_long(run.layers, [layer])[["step", "layer", "grad_l2"]], "grad_l2")
    return find_spikes(grad, rule)["step"].tolist() if layer in grad else []


def _onset_lines(fig: go.Figure, rows: int, col: int, steps) -> list[dict]:
    """Dotted vertical lines at `steps` through every row of subplot column `col`."""
    shapes = []
    for row in range(1, rows + 1):
        axes = fig.get_subplot(row, col)
        xref, yref = axes.xaxis.plotly_name.replace("axis", ""), axes.yaxis.plotly_name.replace("axis", "")
        shapes += [dict(type="line", xref=xref, yref=f"{yref} domain", x0=step, x1=step, y0=0, y1=1,
                        layer="below", line=dict(color=SPIKE_COLOR, width=1, dash="dot")) for step in steps]
    return shapes


def _side_by_side(table: pd.DataFrame, layers: list[str], rows, title: str, spikes: dict,
                  max_points: int) -> go.Figure:
    """One column per layer, one row per (columns, axis title, log) of `rows`; each layer's
    gradient-spike onsets (`spikes`: layer -> steps) as dotted lines through its column."""
    fig = make_subplots(rows=len(rows), cols=len(layers), shared_xaxes=True, vertical_spacing=0.05,
                        horizontal_spacing=0.08, column_titles=[label(layer) for layer in layers])
    for r, (columns, axis, log) in enumerate(rows, start=1):
        for c, layer in enumerate(layers, start=1):
            shown = []
            for k, column in enumerate(columns):
                wide = pivot_layers(_long(table, [layer])[["step", "layer", column]], column)
                if layer not in wide:
                    continue
                series = wide[layer].dropna()
                if log:
                    series = series[series > 0]
                line = decimate(series, max_points, [s for s in spikes.get(layer, []) if s in series.index])
                shown.append(line.to_numpy())
                fig.add_trace(go.Scatter(x=line.index, y=line.to_numpy(), mode="lines", name=label(column),
                                         line=dict(color=PALETTE[(c - 1) % len(PALETTE)], dash=("solid", "dot")[k % 2]),
                                         legendgroup=column, showlegend=c == 1 and len(columns) > 1,
                                         hovertemplate=f"{label(layer)}, step %{{x}}<br>{label(column)} %{{y:.3g}}"
                                                       "<extra></extra>"),
                              row=r, col=c)
            values = np.concatenate(shown) if shown else np.array([])
            ticks = log_ticks(values) if log and shown else dict(tickformat="~g")  # no "200µ"
            # a share that stays at 0 is drawn on 0..1, not plotly's -1..1 (the series hold no NaN)
            nonnegative = not log and values.size > 0 and values.min() >= 0
            fig.update_yaxes(title_text=axis if c == 1 else None, type="log" if log else "linear", row=r, col=c,
                             **ticks, **(dict(rangemode="nonnegative") if nonnegative else {}))
    shapes = [shape for c, layer in enumerate(layers, start=1)
              for shape in _onset_lines(fig, len(rows), c, spikes.get(layer, []))]
    for c in range(1, len(layers) + 1):
        fig.update_xaxes(title_text="step", row=len(rows), col=c)
    fig.update_layout(**LAYOUT)
    fig.update_layout(title=title, title_font_size=14, height=170 * len(rows) + 120, margin=dict(t=90),
                      shapes=shapes)
    return fig


def optimizer_state_figure(run, *, layers=None, rule=None, max_points: int = MAX_POINTS) -> go.Figure | None:
    """Optimizer-state columns of the first layer and the last block (or `layers`), side by
    side, gradient-spike onsets (`rule`) marked; None when the run has no such column."""
    table = run.layers
    present = [(col, axis, log) for col, axis, log in OPTIMIZER_ROWS
               if col in table and table[col].notna().any()]
    if not present:
        return None
    layers = list(layers or first_and_last(run, table["layer"].unique()))
    spikes = {layer: _spike_steps(run, layer, rule) for layer in layers}
    return _side_by_side(table, layers, [([col], axis, log) for col, axis, log in present],
                         f"Optimizer state: first layer and last block (dotted red: the layer's gradient-spike "
                         f"onsets under {SpikeRule.parse(rule)})", spikes, max_points)


def attention_figure(run, *, blocks=None, rule=None, max_points: int = MAX_POINTS) -> go.Figure | None:
    """Attention entropy (mean and min over heads, 1 = uniform) and max logit of the first
    and the last block (or `blocks`), side by side; None without an attention table."""
    table = run.table("attention")
    if table.empty:
        return None
    names = [str(b) for b in table["layer"].cat.categories]
    blocks = list(blocks or dict.fromkeys([names[0], first_and_last(run, names)[1]]))
    spikes = {block: _spike_steps(run, block, rule) for block in blocks}
    rows = [(["entropy_mean", "entropy_min"], "entropy / log N", False), (["max_logit"], "max logit", False)]
    return _side_by_side(table, blocks, rows, "Attention: first and last block (dotted red: the block's "
                         f"gradient-spike onsets under {SpikeRule.parse(rule)})", spikes, max_points)


def optimizer_state_section(run, *, rule=None) -> Section | None:
    fig = optimizer_state_figure(run, rule=rule)
    if fig is None:
        return None
    return Section("Optimizer state", [fig], note=(
        "Per layer group, every logged step. g²/v̂ (adam_freshness) far below 1 for a stretch, then far "
        "above it, is Adam's preconditioner lagging behind the gradient; update RMS / lr far above its "
        "usual level is the resulting burst. Columns: docs/run_directory.md."))


def attention_section(run, *, rule=None) -> Section | None:
    fig = attention_figure(run, rule=rule)
    if fig is None:
        return None
    return Section("Attention", [fig], note=(
        "On the first log.attention_samples images of the probed steps' first view. An entropy falling "
        "towards 0 (nearly one-hot attention) and a growing max logit are the attention-collapse signals."))


# ---------------------------------------------------------------------------- replays

@dataclass
class ReplayComparison:
    """The replays of one window: `ratios` (index: replay label, columns: layers in model order,
    then `spikes`), `knn` (step, source, top1, replay) over the replayed steps, `window` =
    (first step, last step) compared, `start` = first step replayed."""

    at: int
    steps: int
    window: tuple[int, int]
    start: int
    ratios: pd.DataFrame
    knn: pd.DataFrame


def _label(replay) -> str:
    return replay.meta["replay"].get("mitigation") or "unchanged replay"


def _replayed_grad(original: pd.DataFrame, replay) -> pd.DataFrame:
    """A replay's gradient norms behind the original's up to the checkpoint it started from:
    the running medians at the window's start need the steps before it."""
    replayed = replay.grad_norms()
    before = original[original.index < replay.meta["replay"]["from_step"] + 1]
    return pd.concat([before.reindex(columns=replayed.columns), replayed])


def replay_comparisons(run, replays=None, *, rule=None) -> list[ReplayComparison]:
    """One comparison per replayed window (`--at`, `--steps`) of `run`; `replays` default:
    `stabilitylab.replay.find_replays(run)`."""
    from stabilitylab.replay import find_replays

    rule = SpikeRule.parse(rule)
    replays = find_replays(run) if replays is None else replays
    if not replays:
        return []
    grad = run.grad_norms()
    windows: dict[tuple[int, int], list] = {}
    for replay in replays:
        info = replay.meta.get("replay") or {}
        if "at" in info:
            windows.setdefault((info["at"], info["steps"]), []).append(replay)
    out = []
    for (at, steps), members in sorted(windows.items()):
        # the unchanged replay right after the original: it tells whether the window reproduces
        members = sorted(members, key=lambda r: _label(r) != "unchanged replay")
        labels = [_label(r) for r in members]
        # the same change replayed twice (a determinism check, other threads) keeps both rows
        labels = [f"{name} ({r.path.name})" if labels.count(name) > 1 else name for name, r in zip(labels, members)]
        window = (at, at + steps - 1)
        start = min(r.meta["replay"]["from_step"] for r in members) + 1
        ratios, knn = {}, []
        for name, series, curves in [("original", grad, run.knn),
                                     *((name, _replayed_grad(grad, r), r.knn) for name, r in zip(labels, members))]:
            relative = running_ratio(series, rule.window).loc[window[0]:window[1]]
            events = find_spikes(series, rule)
            ratios[name] = relative.max().reindex(grad.columns).tolist() + [
                int(events["step"].between(*window).sum())]
            for source, rows in knn_curves(curves).items():
                rows = rows.loc[start:window[1], ["top1"]].assign(source=source, replay=name)
                knn.append(rows.rename_axis("step").reset_index())
        table = pd.DataFrame.from_dict(ratios, orient="index", columns=[*map(str, grad.columns), "spikes"])
        out.append(ReplayComparison(at, steps, window, start, table,
                                    pd.concat(knn, ignore_index=True) if knn else
                                    pd.DataFrame(columns=["step", "top1", "source", "replay"])))
    return out


def replay_figure(comparison: ReplayComparison) -> go.Figure:
    """Left: the largest ratio per layer in the window, one bar per replay (log y). Right: the
    kNN top-1 over the replayed steps, one line per replay and source (val dotted)."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1, subplot_titles=[
        f"largest ‖g‖ / running median, steps {comparison.window[0]}–{comparison.window[1]}",
        f"kNN top-1, steps {comparison.start}–{comparison.window[1]}"])
    layers = [c for c in comparison.ratios.columns if c != "spikes"]
    colors = {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(comparison.ratios.index)}
    for name, row in comparison.ratios.iterrows():
        fig.add_trace(go.Bar(x=[label(layer) for layer in layers], y=row[layers].to_numpy(dtype=float),
                             name=label(name), legendgroup=label(name), marker_color=colors[name],
                             hovertemplate=f"{label(name)}<br>%{{x}}: %{{y:.3g}}x running median<extra></extra>"),
                      row=1, col=1)
    for (name, source), rows in comparison.knn.groupby(["replay", "source"], sort=False):
        fig.add_trace(go.Scatter(x=rows["step"], y=rows["top1"] * 100, mode="lines+markers",
                                 name=f"{label(name)} ({label(source)})", legendgroup=label(name),
                                 line=dict(dash="solid" if source == "queue" else "dot",
                                           color=colors.get(name, PALETTE[0])),
                                 hovertemplate=f"{label(name)} ({label(source)})<br>step %{{x}}: top-1 %{{y:.3g}}%"
                                               "<extra></extra>"), row=1, col=2)
    ratios = comparison.ratios[layers].to_numpy(dtype=float).ravel()
    ratios = ratios[np.isfinite(ratios) & (ratios > 0)]
    span = [np.log10(ratios.min()) - 0.1, np.log10(ratios.max()) + 0.1] if len(ratios) else None
    fig.update_yaxes(type="log", title_text="× running median", row=1, col=1, range=span, **log_ticks(ratios))
    fig.update_yaxes(title_text="top-1 (%)", row=1, col=2)
    fig.update_xaxes(title_text="step", row=1, col=2)
    fig.update_layout(**LAYOUT)
    fig.update_layout(title=f"Replay at step {comparison.at}: each mitigation beside the original", title_font_size=14,
                      barmode="group", height=460, margin=dict(t=90))
    return fig


def common_knn(comparison: ReplayComparison) -> tuple[str | None, int | None, pd.Series]:
    """(source, step, top-1 per replay) of the last kNN evaluation in the window that the
    original and every replay with rows share: the fresh-bank `val` source when the window
    has it (less noisy), else `queue`. A replay's last step is often an extra evaluation
    that the original never made, so "the last value" of each would compare different steps."""
    knn = comparison.knn
    if knn.empty:
        return None, None, pd.Series(dtype=float)
    source = "val" if (knn["source"] == "val").any() else "queue"
    curve = knn[knn["source"] == source]
    shared = set.intersection(*(set(rows["step"]) for _, rows in curve.groupby("replay")))
    if not shared:
        return source, None, pd.Series(dtype=float)
    step = max(shared)
    return source, step, curve[curve["step"] == step].groupby("replay")["top1"].last()


def replay_sections(run, *, rule=None) -> list[Section]:
    """One section per replayed window: the figure and the table of `replay_comparisons`,
    with the kNN top-1 of each replay at the window's last shared evaluation (`common_knn`)."""
    sections = []
    for comparison in replay_comparisons(run, rule=rule):
        table = comparison.ratios.round(1).rename_axis("replay").reset_index()
        source, step, top1 = common_knn(comparison)
        if step is not None:
            table[f"kNN top-1 ({source}) at step {step} (%)"] = table["replay"].map(top1 * 100).round(1)
        knn_words = (f"the kNN top-1 is the {source} one at step {step}, the last evaluation in the window that "
                     "the original and every replay share" if step is not None else
                     "the original and the replays share no kNN evaluation in the window")
        sections.append(Section(f"Replay at step {comparison.at}", [replay_figure(comparison)], [table], note=(
            f"Steps {comparison.start}–{comparison.window[1]} rerun from a checkpoint, once unchanged and once per "
            f"mitigation. The largest ratio per layer and the spike counts cover steps {comparison.window[0]}–"
            f"{comparison.window[1]}, each replay on the original run's baseline (its history before the "
            f"replay); {knn_words}. A frozen patch projection was frozen at its weights at the checkpoint "
            "(so that replay logs no patch_embed).")))
    return sections
