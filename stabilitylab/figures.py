"""Static figures for papers (matplotlib, PNG + PDF): kNN curves, their spread over seeds,
and the paper's Figure 4 form.

Figures are built on `matplotlib.figure.Figure` directly (no pyplot, no global backend
switch), so this is safe to call from Jupyter and from a headless command line.
"""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import config_table, find_knn_dips, knn_curves, varied_keys
from analysis import running_ratio
from stabilitylab.plots import decimate, default_layers

FORMATS = ("png", "pdf")


def mpl_text(text) -> str:
    """A name shown literally by matplotlib (no mathtext, not hidden from the legend)."""
    text = str(text).replace("$", r"\$")
    return " " + text if text.startswith("_") else text


def knn_plot(runs, dips: dict | None = None) -> Figure:
    """kNN top-1 vs step of each run: queue as a line, val as markers; dips shaded.

    `dips` maps a run name to its dips frame (start_step, end_step), e.g. from
    `analysis.find_knn_dips`.
    """
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    for run in runs:
        for source, rows in knn_curves(run.knn).items():
            curve = decimate(rows["top1"] * 100)
            name = source if len(runs) == 1 else (
                run.name if source == "queue" else f"{run.name} ({source})")
            style = dict(lw=1) if source == "queue" else dict(ls="none", marker="o", ms=3)
            ax.plot(curve.index, curve.to_numpy(), label=mpl_text(name), **style)
        for dip in (dips or {}).get(run.name, pd.DataFrame()).itertuples():
            ax.axvspan(dip.start_step, dip.end_step, color="tab:red", alpha=0.15, lw=0)
    ax.set(xlabel="step", ylabel="kNN top-1 (%)", title=mpl_text(runs[0].name) if len(runs) == 1 else "")
    ax.legend(frameon=False, fontsize="small")
    return fig


def setting_labels(runs, seed_key="seed", keys=None) -> list[str]:
    """One label per run naming the config values that differ between the runs, seed
    excluded, so that the seeds of one setting share a label ("all" when nothing differs).

    keys: the dotted config keys to name instead (e.g. ["optim.batch_size", "optim.base_lr"]),
    for sweeps whose settings also differ in keys that follow from these.
    """
    config = config_table(runs)
    varied = varied_keys(config, exclude=[seed_key]) if keys is None else list(keys)
    if unknown := [k for k in varied if k not in config.columns]:
        raise ValueError(f"no run's config has {', '.join(unknown)}")
    return [", ".join(f"{c.split('.')[-1]}={row[c]}" for c in varied) or "all"
            for _, row in config.iterrows()]


def knn_seeds_plot(runs, source="val", x=None, keys=None) -> Figure:
    """kNN top-1 of each setting (see `setting_labels`): mean over its seeds as a line and
    +-1 standard deviation as a band, at the points every seed evaluated.

    x: "step" or "epoch"; default "epoch" when the runs' steps per epoch differ (batch
    sizes), so that their bands line up, else "step".
    keys: the config keys that name a setting (see `setting_labels`).
    """
    if x is None:
        x = "epoch" if len({round(n) for n in map(steps_per_epoch, runs) if n}) > 1 else "step"
    if x not in ("step", "epoch"):
        raise ValueError(f"x must be 'step' or 'epoch', not {x!r}")
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    curves = {}
    for run, label in zip(runs, setting_labels(runs, keys=keys)):
        curve = knn_curves(run.knn).get(source)
        if curve is not None:
            top1 = curve["top1"] * 100
            if x == "epoch":
                top1.index = curve["epoch"].round(6)
            curves.setdefault(label, []).append(top1)
    for label, members in curves.items():
        table = pd.concat(members, axis=1, join="inner")
        mean, std = table.mean(axis=1), table.std(axis=1).fillna(0)
        line, = ax.plot(mean.index, mean.to_numpy(), lw=1.2, label=mpl_text(f"{label} (n={table.shape[1]})"))
        ax.fill_between(mean.index, (mean - std).to_numpy(), (mean + std).to_numpy(),
                        color=line.get_color(), alpha=0.2, lw=0)
    ax.set(xlabel=x, ylabel=f"kNN top-1 ({source}, %)", title="mean and ±1 sd over seeds")
    ax.legend(frameon=False, fontsize="small")
    return fig


def steps_per_epoch(run) -> float | None:
    """Optimizer steps per epoch of a run, read off its kNN rows (step + 1 over epoch)."""
    rows = run.knn.dropna(subset=["epoch"]) if "epoch" in run.knn else run.knn.iloc[:0]
    rows = rows[rows["epoch"] > 0]
    return None if rows.empty else float(((rows["step"] + 1) / rows["epoch"]).median())


def first_last_plot(grad_norms: pd.DataFrame, title: str = "") -> Figure:
    """First layer vs last transformer block gradient norm, each over its causal running
    median (Figure 4 form)."""
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    layers = default_layers(grad_norms.columns)
    for layer in dict.fromkeys([layers[0], layers[-1]]):
        curve = decimate(running_ratio(grad_norms[layer]).dropna())
        ax.plot(curve.index, curve.to_numpy(), lw=0.8, label=mpl_text(layer))
    ax.set(xlabel="step", ylabel="gradient norm / running median", yscale="log", title=mpl_text(title))
    ax.legend(frameon=False, fontsize="small")
    return fig


def write_figures(runs, directory) -> list[Path]:
    """Write, per run, NAME_knn and NAME_grad_first_last (plus knn_overlay for several runs,
    and knn_seeds when some setting has several seeds) as PNG and PDF into `directory`;
    returns the paths written. Runs without the data for a figure are skipped."""
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
            paths += save(first_last_plot(grad_norms, run.name), directory / f"{stem}_grad_first_last")
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
