"""Figure 8 -- which spike rule: precision, recall by size, false alarms and timing of candidate
`analysis.SpikeRule`s on planted spikes, and their event counts on the committed real runs.

    python benchmarks/bench_detectors.py --quick   # 4 series per noise model, the 4 sample runs
    python benchmarks/bench_detectors.py           # 40 series per noise model, every run in
                                                   #   data_samples/runs/** (about a minute)

Synthetic: per noise model (Gaussian or Student-t(4) noise in log space, sigma 0.05 / 0.1 /
0.2 / 0.5, around a slow downward drift of the level by a factor e), series of 6,000 steps
in pairs of layers. The first layer of a pair gets 20 planted spikes (4 each of 2x, 3x, 5x,
10x, 30x, in random order, 250-300 steps apart after the 50-step warm-up); each multiplies
three consecutive values by the square root of its size, its size, and the square root again
(onset, peak, decay: a detector may flag the onset or only the peak). The second
layer gets the same spikes 3 steps later (known lag). The same noise without spikes gives
the false-alarm rate. An event finds a planted spike when the spike's step lies within
2 steps of the event's first..last flagged step.

Columns: recall per planted size; precision (events that find a planted spike of any size /
all events, planted series); "< 3x" (events whose ratio over the causal running median is
under 3, per 1,000 steps, planted and pure-noise series: what the issue calls noise
excursions nobody wants to be woken for); "10x missed" (values >= 10x their running median
after the warm-up that no event covers, the paper-style excursions a rule must never miss);
timing (mean |first flagged step - planted onset| of the found spikes, in steps) and lag
(planted pairs found in both layers whose event steps differ by exactly the planted 3); false
alarms per 1,000 steps of pure noise, per noise model.

Real: every run under data_samples/runs: events per rule (all layers), events under 3x, and
the >= 10x values no event covers. Everything uses each rule's own window and warm-up.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import DEFAULT_RULE, SpikeRule, find_spikes, running_ratio  # noqa: E402

CANDIDATES = ["mad:6", "ratio:10", "sigma:7", "sigma:7,window=1000", "ratio:3", "ratio:5",
              "mad:6+ratio:3", "mad:6+ratio:3|ratio:10", "mad:5+ratio:3|ratio:10",
              "mad:7+ratio:3|ratio:10", "mad:8+ratio:3|ratio:10", "mad:6+ratio:2|ratio:10", "mad:6+ratio:5|ratio:10"]
NOISES = [(kind, sigma) for kind in ("gauss", "t4") for sigma in (0.05, 0.1, 0.2, 0.5)]
SIZES = (2, 3, 5, 10, 30)
N_STEPS, PER_SIZE, LAG, TOLERANCE = 6000, 4, 3, 2


def result(figure: str, value: str, goal: str = "", status: str = "") -> None:
    print(f"RESULT | {figure} | {value} | {goal} | {status}", flush=True)


def noise(kind: str, sigma: float, shape, rng) -> np.ndarray:
    """Log-space noise of the given model, scaled by sigma."""
    z = rng.standard_normal(shape) if kind == "gauss" else rng.standard_t(4, shape)
    return sigma * z


def planted_series(kind: str, sigma: float, n_pairs: int, seed: int):
    """(planted frame, pure-noise frame, plants): 2 * n_pairs columns, pair i = columns
    f{i} (first) and l{i} (LAG steps later); plants has column, step, size, pair, role."""
    rng = np.random.default_rng(seed)
    drift = -np.arange(N_STEPS) / N_STEPS  # the level falls by a factor e over the series
    columns = [f"{role}{i}" for i in range(n_pairs) for role in ("f", "l")]
    log_x = drift[:, None] + noise(kind, sigma, (N_STEPS, len(columns)), rng)
    pure = pd.DataFrame(np.exp(drift[:, None] + noise(kind, sigma, (N_STEPS, len(columns)), rng)),
                        columns=columns)
    plants = []
    for i in range(n_pairs):
        sizes = rng.permutation(np.repeat(SIZES, PER_SIZE))
        steps = 100 + np.cumsum(rng.integers(250, 301, len(sizes)))
        for role, offset in (("f", 0), ("l", LAG)):
            c = columns.index(f"{role}{i}")
            for k, power in enumerate((0.5, 1.0, 0.5)):
                log_x[steps + offset + k, c] += power * np.log(sizes)
            plants.append(pd.DataFrame({"column": f"{role}{i}", "step": steps + offset, "size": sizes,
                                        "pair": i, "role": role, "onset": steps}))
    return pd.DataFrame(np.exp(log_x), columns=columns), pure, pd.concat(plants, ignore_index=True)


def covered(events: pd.DataFrame, column, steps: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Index of the event of `column` whose [step - tolerance, end_step + tolerance] holds
    each of `steps`, or -1."""
    ev = events[events["layer"] == column]
    if ev.empty:
        return np.full(len(steps), -1)
    start, end = ev["step"].to_numpy() - tolerance, ev["end_step"].to_numpy() + tolerance
    pos = np.searchsorted(start, steps, side="right") - 1
    ok = (pos >= 0) & (steps <= end[np.maximum(pos, 0)])
    return np.where(ok, ev.index.to_numpy()[np.maximum(pos, 0)], -1)


def ten_x_missed(frame: pd.DataFrame, events: pd.DataFrame, rule: SpikeRule) -> tuple[int, int]:
    """(values >= 10x their running median after the warm-up that no event covers, all such)."""
    ratio = running_ratio(frame, rule.window)
    missed = total = 0
    for column in frame.columns:
        x = ratio[column].dropna()
        big = x.index[rule.warmup:][x.to_numpy()[rule.warmup:] >= 10].to_numpy()
        total += len(big)
        missed += int(np.sum(covered(events, column, big) < 0))
    return missed, total


def score_synthetic(rule: SpikeRule, planted: pd.DataFrame, pure: pd.DataFrame, plants: pd.DataFrame) -> dict:
    events = find_spikes(planted, rule)
    events["layer"] = events["layer"].astype(str)
    false_events = find_spikes(pure, rule)
    plants = plants.copy()
    plants["event"] = -1
    for column, rows in plants.groupby("column").groups.items():
        plants.loc[rows, "event"] = covered(events, column, plants.loc[rows, "step"].to_numpy(), TOLERANCE)
    found = plants[plants["event"] >= 0]
    event_step = events["step"].reindex(found["event"]).to_numpy()
    pairs = found.pivot_table(index=["pair", "onset"], columns="role", values="event", aggfunc="first").dropna()
    pair_lags = (events["step"].reindex(pairs["l"]).to_numpy() - events["step"].reindex(pairs["f"]).to_numpy())
    missed, total = ten_x_missed(planted, events, rule)
    missed_pure, total_pure = ten_x_missed(pure, false_events, rule)
    steps = planted.size + pure.size
    return {
        **{f"recall {s}x": (plants.loc[plants["size"] == s, "event"] >= 0).mean() for s in SIZES},
        "n_events": len(events), "n_true": found["event"].nunique(),
        "under_3x": int((events["ratio"] < 3).sum() + (false_events["ratio"] < 3).sum()), "steps": steps,
        "timing": np.mean(np.abs(event_step - found["step"].to_numpy())) if len(found) else np.nan,
        "lag_exact": np.mean(pair_lags == LAG) if len(pairs) else np.nan,
        "false_per_1000": 1000 * len(false_events) / pure.size,
        "ten_x_missed": missed + missed_pure, "ten_x_total": total + total_pure,
    }


def real_runs(rules: list[SpikeRule], root: Path, quick: bool) -> pd.DataFrame:
    from stabilitylab.run import is_run_dir, load_run

    paths = sorted(p.parent for p in root.rglob("meta.json") if is_run_dir(p.parent))
    if quick:
        paths = [p for p in paths if p.parent == root]
    rows = []
    norms = [load_run(p).grad_norms() for p in paths]
    for rule in rules:
        n_events = under = missed = total = 0
        for frame in norms:
            events = find_spikes(frame, rule)
            events["layer"] = events["layer"].astype(str)
            n_events += len(events)
            under += int((events["ratio"] < 3).sum())
            m, t = ten_x_missed(frame, events, rule)
            missed, total = missed + m, total + t
        rows.append({"rule": str(rule), "runs": len(paths), "events": n_events, "under_3x": under,
                     "ten_x_missed": missed, "ten_x_total": total})
    return pd.DataFrame(rows)


def cell(rule: str) -> str:
    """A rule as a Markdown table cell: code, with its | escaped."""
    return "`" + rule.replace("|", "\\|") + "`"


def pct(x) -> str:
    return "—" if pd.isna(x) else f"{100 * x:.0f}%"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 series per noise model, the 4 sample runs")
    parser.add_argument("--runs", type=Path, default=ROOT / "data_samples" / "runs",
                        help="folder searched for run directories (default data_samples/runs)")
    parser.add_argument("--rules", nargs="+", default=CANDIDATES, help="spike rules to compare")
    args = parser.parse_args(argv)
    rules = [SpikeRule.parse(text) for text in args.rules]
    if DEFAULT_RULE not in rules:
        rules.append(DEFAULT_RULE)
    n_pairs = 2 if args.quick else 20
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; python {platform.python_version()}, pandas {pd.__version__}")
    t0 = time.process_time()

    scores = []
    for k, (kind, sigma) in enumerate(NOISES):
        planted, pure, plants = planted_series(kind, sigma, n_pairs, seed=k)
        for rule in rules:
            scores.append({"rule": str(rule), "noise": f"{kind} σ={sigma:g}",
                           **score_synthetic(rule, planted, pure, plants)})
    scores = pd.DataFrame(scores)
    pooled = scores.groupby("rule", sort=False).agg(
        **{f"recall {s}x": (f"recall {s}x", "mean") for s in SIZES},
        n_events=("n_events", "sum"), n_true=("n_true", "sum"), under_3x=("under_3x", "sum"),
        steps=("steps", "sum"), timing=("timing", "mean"), lag=("lag_exact", "mean"),
        ten_x_missed=("ten_x_missed", "sum"), ten_x_total=("ten_x_total", "sum"))
    print(f"\n### Planted spikes: {len(NOISES)} noise models x {2 * n_pairs} series x {N_STEPS:,} steps "
          f"({PER_SIZE * n_pairs * 2} spikes of each size per model)\n")
    print("| rule | " + " | ".join(f"recall {s}×" for s in SIZES)
          + " | precision | < 3× per 1k steps | ≥10× missed | timing error (steps) | lag exact |")
    print("|---|" + "---|" * (len(SIZES) + 5))
    for rule, r in pooled.iterrows():
        print(f"| {cell(rule)} | " + " | ".join(pct(r[f"recall {s}x"]) for s in SIZES)
              + f" | {pct(r.n_true / r.n_events if r.n_events else np.nan)} | {1000 * r.under_3x / r.steps:.2f}"
              f" | {r.ten_x_missed:.0f} of {r.ten_x_total:.0f} | {r.timing:.2f} | {pct(r.lag)} |")
    false_alarms = scores.pivot(index="rule", columns="noise", values="false_per_1000").reindex(
        index=pooled.index, columns=[f"{kind} σ={sigma:g}" for kind, sigma in NOISES])
    print("\n### False alarms per 1,000 steps of pure noise\n")
    print("| rule | " + " | ".join(false_alarms.columns) + " |\n|---|" + "---|" * len(false_alarms.columns))
    for rule, r in false_alarms.iterrows():
        print(f"| {cell(rule)} | " + " | ".join(f"{v:.2f}" for v in r) + " |")
    recall5 = scores.pivot(index="rule", columns="noise", values="recall 5x").reindex(
        index=pooled.index, columns=false_alarms.columns)
    print("\n### Recall of planted 5× spikes per noise model\n")
    print("| rule | " + " | ".join(recall5.columns) + " |\n|---|" + "---|" * len(recall5.columns))
    for rule, r in recall5.iterrows():
        print(f"| {cell(rule)} | " + " | ".join(pct(v) for v in r) + " |")

    real = real_runs(rules, args.runs, args.quick)
    where = args.runs.relative_to(ROOT) if args.runs.is_relative_to(ROOT) else args.runs
    print(f"\n### Committed runs ({real['runs'].iloc[0]} under {where})\n")
    print("| rule | events (all layers) | events < 3× | ≥10× values missed |\n|---|---|---|---|")
    for r in real.itertuples():
        print(f"| {cell(r.rule)} | {r.events} | {r.under_3x} | {r.ten_x_missed} of {r.ten_x_total} |")
    print(f"\nCPU time {time.process_time() - t0:.1f} s")

    default = str(DEFAULT_RULE)
    print(f"default rule (analysis.DEFAULT_RULE): {default}")
    d, d_real = pooled.loc[default], real.set_index("rule").loc[default]
    status = (lambda ok: "info" if args.quick else ("met" if ok else "NOT met"))
    result("8 default rule: >=10x values missed, synthetic + committed runs",
           f"{d.ten_x_missed + d_real.ten_x_missed:.0f} of {d.ten_x_total + d_real.ten_x_total:.0f}", "0",
           status(d.ten_x_missed + d_real.ten_x_missed == 0))
    under = d.under_3x + d_real.under_3x
    result("8 default rule: events under 3x, synthetic + committed runs", f"{under:.0f}", "0", status(under == 0))
    result("8 default rule: recall of planted 30x / 10x / 5x / 3x / 2x",
           " / ".join(pct(d[f"recall {s}x"]) for s in reversed(SIZES)), "", "info")
    gauss = false_alarms.loc[default, [c for c in false_alarms.columns if c.startswith("gauss")]].max()
    result("8 default rule: false alarms per 1000 steps, Gaussian log noise sigma <= 0.5",
           f"{gauss:.2f}", "", "info")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
