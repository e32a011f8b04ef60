"""Print the round-2 tables of docs/findings.md (issue 15) from the sweeps of findings2_cpu.sh.

usage: python experiments/findings2_tables.py [OUT_DIR]   (default runs/findings2)

collapse_tiny: the tiny preset at a cool and a hot lr with the mechanism probes, per seed:
attention entropy and max logit of the first block at its step-50 evaluation, the first
step its entropy is below 0.1 of the maximum, the first spike event (default rule), the
evaluated features' effective rank and the fresh-bank kNN at the first and last evaluation.
R1 sweeps (r1_*): per run, its length, fresh-bank kNN (final, best, largest fall in noise
units), spike events under the default rule and >= 10x spikes, the largest excursion, the
lowest attention entropy and largest max logit of any block, the first >= 10x spike and
the first layer's first one (its rank among the layers' onsets: 1 is the paper's order),
and the precursor table of its spikes. Finished and interrupted runs both count (the steps column says how far).
Controls (r1_unstable_* and R3's r3_unstable_*, from step 0 at cpu_unstable's peak lr): the same row for each of
them and for the r1_lr_hot runs at that lr, every run cut at the longest control's length (a control still running shows how far it got), with the
fresh-bank kNN at fixed steps, and per run which moved first: the first >= 10x gradient spike
or a block's max attention logit reaching 1,000.
R2 (r2_*, batch 1024 with the linear lr rule): the fresh-bank kNN of each run and of the
r1_lr_hot runs at the same base lr (batch 256) at equal numbers of images seen, and for the same
runs how far a step moves the blocks' weights (update / weight norm) and where their norm goes.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pandas as pd

from analysis import DEFAULT_RULE, find_spikes, knn_curves, precursor_table, run_signals, summarize_run
from analysis.layers import BLOCK, first_layer, last_block
from stabilitylab.plots_probes import replay_comparisons
from stabilitylab.run import is_run_dir, load_runs

ROUND1 = Path(__file__).with_name("findings_tables.py")
COLLAPSE = "collapse_tiny"
COLLAPSE_STEP = 50  # the first block's attention at this step: collapsed by then at the hot lr
COLLAPSED = 0.1  # mean attention entropy / log N below which a block attends to ~1 token
# sweeps from step 0 at cpu_unstable's peak lr (findings2_cpu.sh): R1's controls and R3's raised eps
CONTROLS = ("r1_unstable_", "r3_unstable_")
CONTROL_KNN_STEPS = (799, 999, 1299, 1599)
# a block's max attention logit at or above this is a burst: section C's collapsed first blocks
# sit at 900-1,560, and no run that learns reaches it (6.4e-2: at most 718)
LOGIT_BURST = 1000
R2 = "r2_"
# images seen at which R2 compares batch sizes: the batch-1024 evaluations at steps 99 ... 999,
# which are the batch-256 ones at steps 399 ... 3999
R2_IMAGES = tuple(102_400 * k for k in (1, 2, 3, 4, 5, 6, 7, 10))


class FirstSteps:
    """The first `n_steps` steps of a run, every table cut there: a run (as `analysis` reads
    one) to compare with runs that stopped sooner."""

    def __init__(self, run, n_steps: int):
        self.run, self.n_steps = run, n_steps
        self.name, self.path, self.config = run.name, run.path, run.config
        self.meta = {**run.meta, "status": run.meta.get("status") if run.steps["step"].max() < n_steps
                     else f"first {n_steps}"}

    def _cut(self, table):
        return table[table["step"] < self.n_steps].reset_index(drop=True)

    def table(self, name):
        return self._cut(self.run.table(name))

    def config_value(self, dotted, default=None):
        return self.run.config_value(dotted, default)

    def grad_norms(self, stat="grad_l2"):
        return self.run.grad_norms(stat).loc[:self.n_steps - 1]

    steps = property(lambda self: self._cut(self.run.steps))
    layers = property(lambda self: self._cut(self.run.layers))
    knn = property(lambda self: self._cut(self.run.knn))
    events = property(lambda self: self._cut(self.run.events))
    linear = property(lambda self: self._cut(self.run.linear))


def _round1():
    """findings_tables.py (run_rule, drawdown_noise, pm) as a module."""
    spec = importlib.util.spec_from_file_location("findings_tables", ROUND1)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _attention(run, stat: str) -> pd.DataFrame:
    return run.table("attention").pivot_table(index="step", columns="layer", values=stat, observed=True)


def collapse_table(runs) -> str:
    """One row per run of the collapse sweep, in lr then seed order."""
    rows = ["| base lr | seed | block-0 entropy / log N at step 50 | block-0 max logit at step 50 | "
            f"first step with block-0 entropy < {COLLAPSED} | first spike event | "
            "effective rank (first → last eval) | fresh-bank kNN % (first → last eval) |", "|---|" + "---|" * 7]
    for run in sorted(runs, key=lambda r: (r.config_value("optim.base_lr"), r.config_value("seed"))):
        entropy, logit = _attention(run, "entropy_mean"), _attention(run, "max_logit")
        val = run.knn[run.knn["source"] == "val"].sort_values("step")
        first, last = val.iloc[0], val.iloc[-1]
        below = entropy.index[entropy["blocks.0"] < COLLAPSED]
        events = find_spikes(run.grad_norms())
        spike = "none" if events.empty else "{layer} {step} ({ratio:.0f}×)".format(**events.sort_values("step").iloc[0])
        rows.append(f"| {run.config_value('optim.base_lr'):g} | {run.config_value('seed')} | "
                    f"{entropy.at[COLLAPSE_STEP, 'blocks.0']:.3f} | {logit.at[COLLAPSE_STEP, 'blocks.0']:.0f} | "
                    f"{below[0] if len(below) else 'never'} | {spike} | "
                    f"{first.effective_rank:.1f} → {last.effective_rank:.1f} | "
                    f"{100 * first.top1:.1f} → {100 * last.top1:.1f} |")
    return "\n".join(rows)


def r1_table(runs, round1) -> str:
    rows = ["| run | steps | final kNN % | best kNN % | largest fall (σ) | spike events | ≥10× spikes | "
            "largest excursion | lowest attention entropy | largest max logit | first ≥10× spike | "
            "first-layer ≥10× onset (rank) |", "|---|" + "---|" * 11]
    for run in runs:
        rule = round1.run_rule(run, str(DEFAULT_RULE))
        s = summarize_run(run, rule=rule)
        norms = run.grad_norms()
        ten_x = find_spikes(norms, round1.run_rule(run, "ratio:10"))
        excursions = s["largest_excursions"]  # largest value / running median per layer; none in a run just started
        top = f"{excursions[0]['layer']} {excursions[0]['ratio']:.1f}×" if excursions else "—"
        attention = run.table("attention")
        lowest = largest = "—"
        if len(attention):
            entropy, logit = _attention(run, "entropy_mean"), _attention(run, "max_logit")
            low = entropy.min().idxmin()
            lowest = f"{entropy[low].min():.2f} ({low}, step {entropy[low].idxmin()})"
            high = logit.max().idxmax()
            largest = f"{logit[high].max():.0f} ({high}, step {logit[high].idxmax()})"
        rows.append(f"| {run.path.parent.name}/{run.name} | {run.steps['step'].max() + 1} "
                    f"({run.meta.get('status')}) | {round1.pm(s['final_top1'], float('nan'), 100)} | "
                    f"{round1.pm(s['best_top1'], float('nan'), 100)} | {round1.drawdown_noise(run):.1f} | "
                    f"{sum(s['spikes'].values())} | {len(ten_x)} | {top} | {lowest} | "
                    f"{largest} | {_onset_cells(run, ten_x, norms.columns)} |")
    return "\n".join(rows)


def _onset_cells(run, ten_x: pd.DataFrame, logged_layers) -> str:
    """'layer step' of the first >= 10x spike, and the first layer's first one with its rank
    among the layers' first ones (1 = it spiked first, the paper's order): 'none' when it
    never reached 10x, 'frozen' when it was not trained (a frozen patch projection logs no
    gradient); '—' for a run without >= 10x spikes."""
    if ten_x.empty:
        return "— | —"
    onsets = ten_x.groupby("layer", observed=True)["step"].min().sort_values(kind="stable")
    first = first_layer(run.meta)
    lead = (f"{onsets[first]} ({list(onsets.index).index(first) + 1} of {len(onsets)})" if first in onsets
            else "none" if first in logged_layers else "frozen")
    return f"{onsets.index[0]} {onsets.iloc[0]} | {lead}"


def _beside_controls(controls, originals) -> list[FirstSteps]:
    """The original runs at the controls' peak lr, then the controls, all cut at the longest
    control's length (a control still running shows how far it got)."""
    n_steps = max(int(run.steps["step"].max()) + 1 for run in controls)
    lrs = {run.config_value("optim.base_lr") for run in controls}
    return [FirstSteps(run, n_steps) for run in
            [*(r for r in originals if r.config_value("optim.base_lr") in lrs), *controls]]


def controls_table(controls, originals, round1) -> str:
    """The R1 row of each run `_beside_controls`, then their fresh-bank kNN at CONTROL_KNN_STEPS."""
    runs = _beside_controls(controls, originals)
    steps = [s for s in CONTROL_KNN_STEPS if s < runs[0].n_steps]
    knn = ["| run | " + " | ".join(f"kNN % at {s}" for s in steps) + " |", "|---|" + "---|" * len(steps)]
    for run in runs:
        val = knn_curves(run.knn)["val"]["top1"]
        knn.append(f"| {run.path.parent.name}/{run.name} | "
                   + " | ".join("—" if s not in val.index else f"{100 * val[s]:.1f}" for s in steps) + " |")
    return f"{r1_table(runs, round1)}\n\n" + "\n".join(knn)


def onset_table(controls, originals, round1) -> str:
    """Which moved first where the storm starts, gradient or attention: per run
    `_beside_controls`, its first >= 10x spike (any layer, and in a block), the largest max
    attention logit of any block up to that step, and the first evaluation with a block at
    >= LOGIT_BURST, with its lag after the first spike."""
    rows = ["| run | first ≥10× spike | first ≥10× spike in a block | largest max logit before it | "
            f"first max logit ≥ {LOGIT_BURST:,} | steps after the first spike |", "|---|" + "---|" * 5]
    for run in _beside_controls(controls, originals):
        ten_x = find_spikes(run.grad_norms(), round1.run_rule(run, "ratio:10")).sort_values("step", kind="stable")
        if ten_x.empty:
            rows.append(f"| {run.path.parent.name}/{run.name} | none | none | — | — | — |")
            continue
        first = ten_x.iloc[0]
        in_block = ten_x[ten_x["layer"].astype(str).str.fullmatch(BLOCK.pattern)]
        block = "none" if in_block.empty else f"{in_block.iloc[0]['layer']} {in_block.iloc[0]['step']}"
        logit = _attention(run, "max_logit")
        before = logit.loc[:first["step"]]
        peak = "—" if before.empty else f"{before.max().max():.0f} ({before.max().idxmax()})"
        burst = logit[(logit >= LOGIT_BURST).any(axis=1)]
        if burst.empty:
            burst_cell, lag = "never", "—"
        else:
            burst_cell = f"{burst.index[0]} ({burst.iloc[0].idxmax()})"
            lag = f"{burst.index[0] - first['step']:+d}"
        rows.append(f"| {run.path.parent.name}/{run.name} | {first['layer']} {first['step']} | {block} | "
                    f"{peak} | {burst_cell} | {lag} |")
    return "\n".join(rows)


def r2_runs(runs) -> list:
    """The R2 runs after the batch-256 r1_lr_hot runs at their base lr; empty without R2 runs."""
    big = [run for run in runs if run.path.parent.name.startswith(R2)]
    lrs = {run.config_value("optim.base_lr") for run in big}
    small = [run for run in runs if run.path.parent.name == "r1_lr_hot" and run.config_value("optim.base_lr") in lrs]
    return [*small, *big] if big else []


def r2_table(runs) -> str:
    """Fresh-bank kNN at equal images seen (R2_IMAGES) for the R2 runs and the batch-256
    r1_lr_hot runs at their base lr (so at a quarter of their peak lr under the linear rule);
    empty without R2 runs. The peak lr is the largest the run's steps used."""
    compared = r2_runs(runs)
    if not compared:
        return ""
    rows = ["| run | optimizer | batch | peak lr | steps | "
            + " | ".join(f"kNN % at {n // 1000}k images" for n in R2_IMAGES) + " |", "|---|" + "---|" * (4 + len(R2_IMAGES))]
    for run in compared:
        batch = run.config_value("optim.batch_size")
        val = knn_curves(run.knn)["val"]["top1"]
        cells = ["—" if n // batch - 1 not in val.index else f"{100 * val[n // batch - 1]:.1f}" for n in R2_IMAGES]
        rows.append(f"| {run.path.parent.name}/{run.name} | {run.config_value('optim.name')} | {batch} | "
                    f"{run.steps['lr'].max():g} | {run.steps['step'].max() + 1} | "
                    + " | ".join(cells) + " |")
    return "\n".join(rows)


def r2_weights_table(runs) -> str:
    """For the runs of r2_table: the blocks' weights (every `blocks.N` layer together) — the
    median ratio of a step's update norm to their norm once the lr is at its peak, their norm
    at the end of warm-up, its smallest value after that and at the last step (each relative to
    step 0), and the steps at which every block's gradient was exactly zero."""
    compared = r2_runs(runs)
    if not compared:
        return ""
    rows = ["| run | optimizer | batch | update / weight norm at peak lr (median, 10–90%) | norm at end of warm-up | "
            "smallest after (step) | at the last step | steps with zero block gradients |", "|---|" + "---|" * 7]
    for run in compared:
        layers = run.layers[run.layers["layer"].astype(str).str.fullmatch(BLOCK)]
        wide = layers.pivot_table(index="step", columns="layer", values=["param_l2", "update_l2", "grad_l2"])
        norm = (wide["param_l2"] ** 2).sum(axis=1) ** 0.5
        ratio = (wide["update_l2"] ** 2).sum(axis=1) ** 0.5 / norm
        peak = run.steps.set_index("step")["lr"]
        at_peak = ratio[ratio.index.isin(peak.index[peak >= peak.max()])]
        warmup = run.config_value("optim.warmup_steps")
        after = norm[norm.index >= warmup]
        smallest = "—" if after.empty else f"{after.min() / norm.iloc[0]:.3g} ({after.idxmin()})"  # still warming up
        zero = int((wide["grad_l2"].max(axis=1) == 0).sum())
        rows.append(f"| {run.path.parent.name}/{run.name} | {run.config_value('optim.name')} | "
                    f"{run.config_value('optim.batch_size')} | {at_peak.median():.3f} ({at_peak.quantile(0.1):.3f}–"
                    f"{at_peak.quantile(0.9):.3f}) | {norm.get(warmup, float('nan')) / norm.iloc[0]:.3g} | "
                    f"{smallest} | {norm.iloc[-1] / norm.iloc[0]:.3g} | {zero} |")
    return "\n".join(rows)


def precursors(runs, round1) -> str:
    """The precursor table of every run with spike events, its events pooled per run."""
    out = []
    for run in runs:
        rule = round1.run_rule(run, str(DEFAULT_RULE))
        events = find_spikes(run.grad_norms(), rule)
        if len(events):
            table = precursor_table(events, run_signals(run), rule=rule)
            rows = [f"{run.path.parent.name}/{run.name}, {len(events)} spike events:", "",
                    "| signal | moved near | before / same step / after | median lead (range) | by chance |",
                    "|---|---|---|---|---|"]
            rows += [f"| {r.signal} | {r.n_moved} | {r.n_before} / {r.n_same_step} / {r.n_after} | "
                     + ("—" if pd.isna(r.median_lead) else f"{r.median_lead:+.0f} ({r.min_lead:+.0f} … {r.max_lead:+.0f})")
                     + f" | {r.chance_moved:.1f} |" for r in table.itertuples()]
            out.append("\n".join(rows))
    return "\n\n".join(out) or "no spike events in any run"


def replay_tables(runs, round1) -> str:
    """Per replayed window (`stabilitylab replay`) of every run: for the original, the unchanged
    replay and each mitigation, the spike events in the window, the largest value / running
    median of any layer there and of the first layer and the last block, and the fresh-bank
    kNN at the evaluations from the first replayed step to the window's end."""
    out = []
    for run in runs:
        rule = round1.run_rule(run, str(DEFAULT_RULE))
        for c in replay_comparisons(run, rule=rule):
            layer_columns = c.ratios.columns.drop("spikes")
            first, last = first_layer(run.meta), last_block(run.meta, layer_columns)
            knn = (c.knn[c.knn["source"] == "val"].pivot_table(index="replay", columns="step", values="top1")
                   .reindex(c.ratios.index))  # a replay still running may have no evaluation yet
            rows = [f"{run.path.parent.name}/{run.name}, steps {c.window[0]}–{c.window[1]} "
                    f"(replayed from step {c.start}):", "",
                    f"| run | spike events | largest ratio | {first} | {last} | "
                    + " | ".join(f"kNN % at {step}" for step in knn.columns) + " |",
                    "|---|" + "---|" * (4 + len(knn.columns))]
            for name, ratios in c.ratios.iterrows():
                layers = ratios.drop("spikes").astype(float)
                times = lambda layer: "—" if pd.isna(layers.get(layer)) else f"{layers[layer]:.1f}×"
                largest = "—" if layers.isna().all() else f"{layers.idxmax()} {layers.max():.1f}×"
                rows.append(f"| {name} | {ratios['spikes']:.0f} | {largest} | "
                            f"{times(first)} | {times(last)} | "
                            + " | ".join("—" if pd.isna(v) else f"{100 * v:.1f}" for v in knn.loc[name]) + " |")
            out.append("\n".join(rows))
    return "\n\n".join(out)


def _logged(runs) -> list:
    """The runs with at least one logged step: a sweep's next run may have just started."""
    for run in runs:
        if not len(run.steps):
            print(f"skipping {run.path}: no step logged yet", file=sys.stderr)
    return [run for run in runs if len(run.steps)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/findings2")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if not out.is_dir():
        parser.error(f"{out} is not a folder: pass the folder that holds the round-2 sweeps (e.g. runs/findings2)")
    sweeps = {p.name: p for p in sorted(out.iterdir())
              if p.is_dir() and (p.name == COLLAPSE or p.name.startswith(("r1_", R2, *CONTROLS))) and any(map(is_run_dir, p.iterdir()))}
    if not sweeps:
        parser.error(f"no {COLLAPSE}, r1_* or r2_* sweep with runs under {out}")
    round1 = _round1()
    if COLLAPSE in sweeps:
        print(f"### {COLLAPSE}: attention and representation collapse at the hot lr\n\n"
              f"{collapse_table(load_runs([sweeps.pop(COLLAPSE)]))}\n")
    if sweeps:
        runs = _logged(load_runs(list(sweeps.values())))
        controls = [run for run in runs if run.path.parent.name.startswith(CONTROLS)]
        print(f"### R1: long horizon, one row per run\n\n{r1_table(runs, round1)}\n")
        if controls:
            originals = [run for run in runs if run.path.parent.name == "r1_lr_hot"]
            print(f"### R1: the controls from step 0, every run cut at the same length\n\n"
                  f"{controls_table(controls, originals, round1)}\n")
            print(f"### R1: where the storm starts, gradient or attention first (same runs)\n\n"
                  f"{onset_table(controls, originals, round1)}\n")
        print(f"### R1: which signal moved first (lookback 50 steps)\n\n{precursors(runs, round1)}")
        if replays := replay_tables(runs, round1):
            print(f"\n### R1: the spikes replayed with each mitigation\n\n{replays}")
        if r2 := r2_table(runs):
            print(f"\n### R2: batch 1024 against batch 256, at equal images seen\n\n{r2}")
            print(f"\n### R2: the blocks' weights, step size and norm\n\n{r2_weights_table(runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
