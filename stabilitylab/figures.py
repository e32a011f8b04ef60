"""Static figures for papers (matplotlib, PNG + PDF): kNN curves, their spread over seeds,
and the paper's Figure 4 form.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no global backend
switch), so this is safe to call from Jupyter and from a headless command line. Colours,
line styles and the grouping of runs by setting are those of the HTML report
(`stabilitylab.plots`). Legends sit below the axes and the figure grows to hold them, so a
legend never covers the data nor shrinks the axes.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from plotly.colors import unconvert_from_RGB_255, unlabel_rgb

from analysis import (SpikeRule, binomial_noise, find_knn_dips, find_spikes, knn_curves, linear_curve,
                      running_ratio)
from stabilitylab.plots import (LINEAR_COLORS, PALETTE, decimate, default_layers, run_styles, seed_bands,
                                setting_labels, steps_per_epoch)

__all__ = ["knn_plot", "knn_seeds_plot", "first_last_plot", "write_figures", "setting_labels",
           "steps_per_epoch", "file_stems", "save"]

FORMATS = ("png", "pdf")
WIDTH, AXES_HEIGHT = 6.4, 3.6  # inches: every figure's axes get this height, the legend adds to it
LEGEND_ROW = 0.2  # inches per legend row
LEGEND_COLUMNS = 3
LINESTYLES = {"solid": "-", "dash": "--", "dot": ":", "dashdot": "-.", "longdash": (0, (8, 3)),
              "longdashdot": (0, (8, 3, 1, 3))}
ORDINALS = ["1st", "2nd", "3rd"]
GREY = (0.25, 0.25, 0.25)


def mpl_text(text) -> str:
    """A name shown literally by matplotlib (no mathtext, not hidden from the legend)."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def mpl_color(color: str) -> tuple:
    """A palette colour `rgb(r, g, b)` as a matplotlib RGB tuple."""
    return unconvert_from_RGB_255(unlabel_rgb(color))


def axes_figure() -> tuple[Figure, object]:
    """A figure with one axes, WIDTH x AXES_HEIGHT before `legend_below` adds its legend."""
    fig = Figure(figsize=(WIDTH, AXES_HEIGHT), layout="constrained")
    return fig, fig.add_subplot()


def source_handle(source: str, color) -> Line2D:
    """Legend entry of a kNN source as `knn_plot` draws it: queue a line, others markers."""
    if source == "queue":
        return Line2D([], [], color=color, lw=1)
    return Line2D([], [], color=color, ls="none", marker="o", ms=3)


def legend_below(fig: Figure, handles, labels) -> None:
    """The legend below the axes, in as many columns (at most LEGEND_COLUMNS) as fit the
    figure's width; the figure grows by the legend's rows, so the axes keep their height."""
    if not handles:
        return
    labels = [mpl_text(name) for name in labels]
    for ncols in range(min(LEGEND_COLUMNS, len(handles)), 0, -1):
        legend = fig.legend(handles, labels, loc="outside lower center", ncols=ncols, frameon=False,
                            fontsize="small")
        fig.draw_without_rendering()
        if ncols == 1 or legend.get_window_extent().width <= fig.bbox.width:
            break
        legend.remove()
    rows = -(-len(handles) // ncols)
    fig.set_size_inches(WIDTH, AXES_HEIGHT + LEGEND_ROW * rows + 0.15)


def knn_plot(runs, dips: dict | None = None) -> Figure:
    """kNN top-1 vs step: queue as a line, val as markers, each with its binomial +-2 sigma
    band (one run); dips shaded; a single run's linear probes as diamonds with +-2 sigma bars
    (per protocol, the colours of the HTML report).

    Several runs: colour per setting, line style per seed (`plots.run_styles`); the legend
    names the settings, the seeds' line styles and the sources instead of every run.
    `dips` maps a run name to its dips frame (start_step, end_step), e.g. from
    `analysis.find_knn_dips`.
    """
    single = len(runs) == 1
    styles = run_styles(runs)
    settings = list(dict.fromkeys(s.setting for s in styles))
    seeds = max(s.seed_index for s in styles) + 1
    sources = sorted({source for run in runs for source in knn_curves(run.knn)})
    fig, ax = axes_figure()
    for run, style in zip(runs, styles):
        for i, (source, rows) in enumerate(knn_curves(run.knn).items()):
            curve = decimate(rows["top1"])
            color = mpl_color(PALETTE[i] if single else style.color)
            x, y = curve.index.to_numpy(), 100 * curve.to_numpy()
            if source == "queue":
                ax.plot(x, y, lw=1, color=color, ls=LINESTYLES[style.dash])
            else:
                ax.plot(x, y, ls="none", marker="o", ms=3, color=color)
            if single and "n_queries" in rows:
                sigma2 = 200 * binomial_noise(curve, rows["n_queries"].reindex(curve.index).astype(float))
                ax.fill_between(x, y - sigma2, y + sigma2, color=color, alpha=0.2, lw=0)
        for dip in (dips or {}).get(run.name, pd.DataFrame()).itertuples():
            ax.axvspan(dip.start_step, dip.end_step, color="tab:red", alpha=0.15, lw=0)
    if single:
        handles = [source_handle(s, mpl_color(PALETTE[i])) for i, s in enumerate(sources)]
        names = [f"{s} (±2σ band)" for s in sources]
        for protocol, rows in linear_curve(runs[0].linear).groupby("protocol", sort=False):
            color = LINEAR_COLORS.get(protocol, "#777777")
            two_sigma = 200 * binomial_noise(rows["top1"], rows["n_val"].astype(float))
            ax.errorbar(rows["step"], 100 * rows["top1"], yerr=two_sigma, ls="none", marker="D", ms=6,
                        color=color, mec="white", capsize=2)
            handles.append(Line2D([], [], ls="none", marker="D", color=color, mec="white"))
            names.append(f"linear probe ({protocol}, ±2σ)")
    else:
        color_of = {s.setting: s.color for s in styles}
        handles = [Line2D([], [], color=mpl_color(color_of[name]), lw=2) for name in settings]
        names = list(settings)
        if seeds > 1:
            handles += [Line2D([], [], color=GREY, lw=1, ls=LINESTYLES[d]) for d in list(LINESTYLES)[:seeds]]
            names += [f"{ORDINALS[i] if i < len(ORDINALS) else f'{i + 1}th'} seed" for i in range(seeds)]
        handles += [source_handle(s, GREY) for s in sources]
        names += [f"{s} (line)" if s == "queue" else f"{s} (markers)" for s in sources]
    ax.set(xlabel="step", ylabel="kNN top-1 (%)", title=mpl_text(runs[0].name) if single else "")
    legend_below(fig, handles, names)
    return fig


def knn_seeds_plot(runs, source="val", x=None, keys=None) -> Figure:
    """kNN top-1 of each setting (see `setting_labels`): mean over its seeds as a line and
    +-1 standard deviation as a band, at the points every seed evaluated (`plots.seed_bands`).

    x: "step" or "epoch"; default "epoch" when the runs' steps per epoch differ (batch
    sizes), so that their bands line up, else "step".
    keys: the config keys that name a setting (see `setting_labels`).
    """
    x, bands = seed_bands(runs, source, x, keys)
    colors = {s.setting: s.color for s in run_styles(runs, keys=keys)}
    fig, ax = axes_figure()
    handles, names = [], []
    for name, band in bands.items():
        color = mpl_color(colors[name])
        mean, std = band["mean"], band["std"]
        line, = ax.plot(mean.index, mean.to_numpy(), lw=1.2, color=color,
                        label=mpl_text(f"{name} (n={int(band['n'].iloc[0])})"))
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(), color=color, alpha=0.2, lw=0)
        handles.append(line)
        names.append(line.get_label())
    ax.set(xlabel=x, ylabel=f"kNN top-1 ({source}, %)", title="mean and ±1 sd over seeds")
    legend_below(fig, handles, names)
    return fig


def first_last_plot(grad_norms: pd.DataFrame, title: str = "", rule=None) -> Figure:
    """First layer vs last transformer block gradient norm, each over its causal running
    median (Figure 4 form), the peak of every spike event of either marked; `rule` (a
    `SpikeRule` or its text, default `DEFAULT_RULE`) finds the events and sets the window."""
    rule = SpikeRule.parse(rule)
    layers = default_layers(grad_norms.columns)
    layers = list(dict.fromkeys([layers[0], layers[-1]]))
    spikes = find_spikes(grad_norms[layers], rule)
    relative = running_ratio(grad_norms[layers], rule.window)
    fig, ax = axes_figure()
    handles, names = [], []
    for i, layer in enumerate(layers):
        color = mpl_color(PALETTE[i])
        values = relative[layer].dropna()
        mine = spikes[spikes["layer"].astype(str) == layer]
        curve = decimate(values, keep=[*mine["step"], *mine["peak_step"]])
        line, = ax.plot(curve.index, curve.to_numpy(), lw=0.8, color=color)
        marks, = ax.plot(mine["peak_step"], values.reindex(mine["peak_step"]).to_numpy(), ls="none",
                         marker="x", ms=6, color=color)
        handles += [line, marks]
        names += [layer, f"{layer} spikes ({len(mine)})"]
    ax.set(xlabel="step", ylabel=f"‖g‖ / median of previous {rule.window}", yscale="log", title=mpl_text(title))
    legend_below(fig, handles, names)
    return fig


def write_figures(runs, directory, *, rule=None) -> list[Path]:
    """Write, per run, NAME_knn and NAME_grad_first_last (plus knn_overlay for several runs,
    and knn_seeds when some setting has several seeds) as PNG and PDF into `directory`;
    returns the paths written. Runs without the data for a figure are skipped. rule: the
    `SpikeRule` (or its text) of the marked spikes; default `DEFAULT_RULE`."""
    runs = list(runs)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    dips = {run.name: find_knn_dips(run.knn) for run in runs}
    for run, stem in zip(runs, file_stems(run.name for run in runs)):
        if len(run.knn):
            paths += save(knn_plot([run], dips), directory / f"{stem}_knn")
        grad_norms = run.grad_norms() if len(run.layers) else pd.DataFrame()
        if not grad_norms.empty:
            paths += save(first_last_plot(grad_norms, run.name, rule), directory / f"{stem}_grad_first_last")
    if len(runs) > 1 and any(len(run.knn) for run in runs):
        paths += save(knn_plot(runs), directory / "knn_overlay")
        labels = setting_labels(runs)
        if len(set(labels)) < len(labels) and any("val" in knn_curves(run.knn) for run in runs):
            paths += save(knn_seeds_plot(runs), directory / "knn_seeds")
    return paths


def file_stems(names) -> list[str]:
    """Run names made safe and unique as file names."""
    stems, seen = [], set()
    for name in names:
        stem = re.sub(r"[^A-Za-z0-9._=-]+", "_", str(name)).strip("._") or "run"
        unique, i = stem, 1
        while unique in seen:
            i += 1
            unique = f"{stem}_{i}"
        seen.add(unique)
        stems.append(unique)
    return stems


def save(fig: Figure, stem: Path, formats=FORMATS) -> list[Path]:
    """Write `fig` as stem.png (200 dpi) and stem.pdf, or in the given `formats`."""
    paths = [stem.with_name(f"{stem.name}.{fmt}") for fmt in formats]
    for path in paths:
        fig.savefig(path, dpi=200)
    return paths
