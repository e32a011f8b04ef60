"""Print the Markdown tables of docs/findings.md from the sweeps of experiments/findings_cpu.sh.

usage: python experiments/findings_tables.py [OUT_DIR]   (default runs/findings)

Per sweep: mean +- sd over seeds of the kNN and gradient-excursion metrics (S0, S1, S4, S6);
frozen - learned final kNN per lr with its standard error (S2); the batch sizes beside the
batch-128 learned runs of the same base lr (S5); the lead-lag test of each
setting, its seeds pooled, under three spike rules (S3); every >=10x spike (S0).
Only finished runs count; sweeps with none are skipped.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from analysis import (DEFAULT_RULE, SpikeRule, binomial_noise, compare_runs, config_table, find_spikes, knn_curves,
                      running_ratio, seed_spread, spike_lead_lag, varied_keys)
from analysis.compare import METRICS
from analysis.layers import last_block
from analysis.spikes import WARMUP
from stabilitylab.run import is_run_dir, load_runs

# sweep folder -> the config keys that name its settings
SWEEPS = {"variants_lr1e-1": ["model.patch_proj", "optim.base_lr"],
          "variants_lr1e-2": ["model.patch_proj", "optim.base_lr"],
          "variants_lr3e-1": ["model.patch_proj", "optim.base_lr"],
          "clip_lr1e-1": ["model.patch_proj_clip", "optim.base_lr"],
          "lamb": ["optim.name", "optim.base_lr"],
          "batch_lr1e-2": ["optim.batch_size", "optim.base_lr"],
          "batch512_long_lr1e-2": ["optim.batch_size", "optim.epochs", "optim.base_lr"],
          "batch512_long_lr1e-1": ["optim.batch_size", "optim.epochs", "optim.base_lr"]}
# S5 sets the batch sweeps beside the batch-128 learned runs of the same base lrs
BATCH_SWEEPS = ("batch_lr1e-2", "batch512_long_lr1e-2", "batch512_long_lr1e-1")
BATCH_REFERENCES = ("variants_lr1e-2", "variants_lr1e-1")
SHORT = {"optim.name": "optimizer"}  # column names where the key's last part says too little
# spike rules of the lead-lag test: the robust z alone, and the paper-style ratio at two levels
SPIKE_RULES = {"mad z≥6": "mad:6", "ratio ≥10×": "ratio:10", "ratio ≥5×": "ratio:5"}
SUMMARY_RULE = str(DEFAULT_RULE)  # the spike metrics of the sweep tables (what `compare` uses)
MAX_LAG = 30  # steps: the paper's caption says "tens of iterations", its text "a couple"
SEED_OFFSET = 100_000
REFERENCE_BATCH = 128  # the spike detectors' 50-step warm-up is meant at this batch size


def spike_warmup(run) -> int:
    """Steps a spike detector skips at the start of `run`: WARMUP at batch 128, the same
    number of images (6,400, 1.3 epochs of the sample) at other batch sizes, so that a
    32-step batch-1024 run is not all warm-up."""
    return math.ceil(WARMUP * REFERENCE_BATCH / run.config_value("optim.batch_size", REFERENCE_BATCH))


def run_rule(run, text: str) -> SpikeRule:
    """The spike rule `text` with `run`'s warm-up (`spike_warmup`)."""
    return SpikeRule.parse(f"{text},warmup={spike_warmup(run)}")


def run_table(runs, by: list[str]) -> pd.DataFrame:
    """`compare_runs` with each run's spike metrics at its own `spike_warmup`, plus the
    kNN drawdown in noise units. Runs sharing a warm-up are summarized together, each group
    with the config columns of the whole set."""
    config = config_table(runs)
    columns = by + varied_keys(config, exclude=by)
    groups = {}
    for i, run in enumerate(runs):
        groups.setdefault(spike_warmup(run), []).append(i)
    table = pd.concat([compare_runs([runs[i] for i in rows], by=columns,
                                    rule=SpikeRule.parse(f"{SUMMARY_RULE},warmup={warmup}")).set_axis(rows)
                       for warmup, rows in groups.items()]).sort_index()
    table["drawdown_noise"] = [drawdown_noise(run) for run in runs]
    return table


def pm(mean, std, scale=1.0, digits=1) -> str:
    if mean is None or pd.isna(mean):
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {scale * std:.{digits}f}"


def drawdown_noise(run) -> float:
    """Largest fall of the fresh-bank kNN below its best so far, in units of one
    evaluation's binomial noise at that accuracy and query count."""
    curve = knn_curves(run.knn).get("val")
    if curve is None or len(curve) < 2:
        return float("nan")
    fall = curve["top1"].cummax() - curve["top1"]
    return float((fall / binomial_noise(curve["top1"], curve["n_queries"])).max())


def spread_table(table: pd.DataFrame, by: list[str], extra: dict | None = None) -> str:
    """Mean +- sd over seeds per setting; `extra` maps more column titles to metric columns
    of `table` (shown before the standard ones)."""
    extra = extra or {}
    spread = seed_spread(table, metrics=[*extra.values(), "final_top1", "best_top1", "n_dips", "drawdown_noise",
                                         "roughness", "first_peak_ratio", "last_peak_ratio"])
    config = [c for c in spread.columns if c in by]
    rows = ["| " + " | ".join([SHORT.get(c, c.split(".")[-1]) for c in config] + ["seeds", *extra] + [
        "final kNN %", "best kNN %", "dips", "largest fall (σ)", "roughness (pts)",
        "first-layer peak / median", "last-block peak / median"]) + " |",
            "|" + "---|" * (len(config) + len(extra) + 8)]
    for _, r in spread.iterrows():
        rows.append("| " + " | ".join([str(r[c]) for c in config] + [str(r["n_seeds"])] + [
            pm(r[f"{m}_mean"], r[f"{m}_std"] or float("nan"), digits=0) for m in extra.values()] + [
            pm(r.final_top1_mean, r.final_top1_std, 100),
            pm(r.best_top1_mean, r.best_top1_std, 100), pm(r.n_dips_mean, r.n_dips_std),
            pm(r.drawdown_noise_mean, r.drawdown_noise_std), pm(r.roughness_mean, r.roughness_std, 100),
            pm(r.first_peak_ratio_mean, r.first_peak_ratio_std), pm(r.last_peak_ratio_mean, r.last_peak_ratio_std)])
            + " |")
    return "\n".join(rows)


def batch_table(runs, metrics: pd.DataFrame) -> str:
    """S5: batch sizes per base lr (peak lr scaled by the linear rule) and epochs, with each
    run's length in steps and its count of >= 10x spikes in any layer. `metrics`: the runs'
    rows of their sweeps' `run_table`, in the same order."""
    by = ["optim.base_lr", "optim.batch_size", "optim.epochs"]
    table = pd.concat([config_table(runs).reindex(columns=[*by, "seed"]),
                       metrics[[*METRICS, "drawdown_noise"]].reset_index(drop=True)], axis=1)
    table["n_steps"] = [len(run.steps) for run in runs]
    table["n_ten_x"] = [len(find_spikes(run.grad_norms(), run_rule(run, "ratio:10")))
                        if len(run.layers) else 0 for run in runs]
    table = table.sort_values(by, kind="stable")
    return spread_table(table, by, extra={"steps": "n_steps", "≥10× spikes": "n_ten_x"})


def frozen_gain(tables: list[pd.DataFrame]) -> str:
    table = pd.concat(tables, ignore_index=True)
    rows = ["| base lr | frozen − learned, final kNN (pts) | seeds (learned, frozen) |", "|---|---|---|"]
    for lr, group in table.groupby("optim.base_lr"):
        top1 = {v: group.loc[group["model.patch_proj"] == v, "final_top1"].dropna() * 100
                for v in ("learned", "frozen")}
        if min(len(v) for v in top1.values()) == 0:
            continue
        gain = top1["frozen"].mean() - top1["learned"].mean()
        se = (f" ± {math.sqrt(sum(v.var(ddof=1) / len(v) for v in top1.values())):.1f} (s.e.)"
              if min(len(v) for v in top1.values()) > 1 else "")
        rows.append(f"| {lr} | {gain:+.1f}{se} | {len(top1['learned'])}, {len(top1['frozen'])} |")
    return "\n".join(rows)


def pooled(runs, rule: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The seeds' gradient norms end to end (steps offset by SEED_OFFSET per run) and their
    spike events, found in each run on its own (own warmup and baseline), for a pooled
    lead-lag test whose circular shifts mix the seeds."""
    norms, events = [], []
    for i, run in enumerate(runs):
        run_norms = run.grad_norms()
        run_events = find_spikes(run_norms, run_rule(run, rule))
        for column in ("step", "peak_step", "end_step"):
            run_events[column] += i * SEED_OFFSET
        run_norms.index = run_norms.index + i * SEED_OFFSET
        norms.append(run_norms)
        events.append(run_events)
    return pd.concat(norms), pd.concat(events, ignore_index=True)


def p_text(p) -> str:
    return "—" if pd.isna(p) else f"{p:.3f}"


def lead_lag_table(settings: dict) -> str:
    rows = [f"| setting | runs | spike rule | first-layer events | last-block events | matched within {MAX_LAG} | "
            "first leads | median lag | xcorr lag | association p | direction p |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for setting, runs in settings.items():
        runs = [r for r in runs if len(r.layers) and "patch_embed" in r.grad_norms().columns]
        if not runs:
            continue
        for label, rule in SPIKE_RULES.items():
            norms, events = pooled(runs, rule)
            ll = spike_lead_lag(norms, max_lag=MAX_LAG, events=events)
            r = ll.per_layer.set_index("layer").loc[ll.last]
            rows.append(f"| {setting} | {len(runs)} | {label} | {r.n_first_events:.0f} | {r.n_layer_events:.0f} | "
                        f"{r.n_matched:.0f} | "
                        f"{'—' if pd.isna(r.frac_first_leads) else f'{r.frac_first_leads:.2f}'} | "
                        f"{'—' if pd.isna(r.median_lag) else f'{r.median_lag:+.0f}'} | {r.xcorr_lag:+.0f} | "
                        f"{p_text(r.association_p)} | {p_text(r.direction_p)} |")
    return "\n".join(rows)


def ten_x_counts(settings: dict) -> str:
    """Spikes of >= 10x the running median (method 'ratio') per layer, summed over each
    setting's seeds, with the largest ratio seen."""
    counts = {}
    columns = [list(map(str, r.grad_norms().columns)) for runs in settings.values() for r in runs if len(r.layers)]
    order = max(columns, key=len, default=[])  # model order, from a run that logs every layer
    for setting, runs in settings.items():
        events = pd.concat([find_spikes(r.grad_norms(), run_rule(r, "ratio:10"))
                            for r in runs if len(r.layers)],
                           ignore_index=True)
        events["layer"] = events["layer"].astype(str)
        counts[f"{setting} ({len(runs)})"] = {
            layer: f"{len(g)} ({g['ratio'].max():.0f}×)" for layer, g in events.groupby("layer")}
    table = pd.DataFrame(counts).T
    table = table.reindex(columns=[c for c in order if c in table.columns]).fillna("0")
    return "| setting (runs) | " + " | ".join(table.columns) + " |\n|" + "---|" * (len(table.columns) + 1) + "\n" + \
        "\n".join(f"| {name} | " + " | ".join(row) + " |" for name, row in table.iterrows())


def first_layer_spikes(runs, max_lag=10) -> str:
    """Every first-layer spike of >= 10x its running median, with the largest ratio the
    last block reaches from that step to `max_lag` steps later."""
    rows = [f"| run | step | patch_embed norm / running median | last block's largest ratio in +0..+{max_lag} (lag) |",
            "|---|---|---|---|"]
    for run in runs:
        if not len(run.layers) or "patch_embed" not in (norms := run.grad_norms()).columns:
            continue
        last = last_block(run.meta, norms.columns)
        ratio = running_ratio(norms[last])
        for e in find_spikes(norms["patch_embed"], run_rule(run, "ratio:10")).itertuples():
            after = ratio.loc[e.peak_step:e.peak_step + max_lag]
            rows.append(f"| {run.path.parent.name}/{run.name} | {e.peak_step} | {e.ratio:.1f} | "
                        f"{after.max():.1f} (+{after.idxmax() - e.peak_step}) |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/findings")
    args = parser.parse_args(argv)
    if not Path(args.out).is_dir():
        parser.error(f"{args.out} is not a folder: pass the folder that holds the sweeps (e.g. runs/findings)")
    variant_tables, all_runs, settings, loaded, tables = [], [], {}, {}, {}
    for sweep, by in SWEEPS.items():
        folder = Path(args.out) / sweep
        if not folder.is_dir() or not any(is_run_dir(p) for p in folder.iterdir()):
            continue
        runs = [run for run in load_runs([folder]) if run.meta.get("status") == "finished"]
        if not runs:
            continue
        all_runs += runs
        loaded[sweep] = runs
        table = tables[sweep] = run_table(runs, by)
        for run, (_, row) in zip(runs, table.iterrows()):
            label = ", ".join(f"{SHORT.get(k, k.split('.')[-1])}={row[k]}" for k in by if k in row)
            settings.setdefault(f"{sweep}: {label}", []).append(run)
        if sweep.startswith("variants"):
            variant_tables.append(table)
        print(f"### {sweep} ({len(runs)} runs)\n\n{spread_table(table, by)}\n")
    if not loaded:
        parser.error(f"no finished run in any of {', '.join(SWEEPS)} under {args.out}")
    if variant_tables:
        print(f"### S2: frozen vs learned\n\n{frozen_gain(variant_tables)}\n")
    if any(sweep in loaded for sweep in BATCH_SWEEPS):
        batch_runs, metrics = [], []
        for sweep in [s for s in (*BATCH_REFERENCES, *BATCH_SWEEPS) if s in loaded]:
            learned = [r.config_value("model.patch_proj") == "learned" for r in loaded[sweep]]
            batch_runs += [r for r, keep in zip(loaded[sweep], learned) if keep]
            metrics.append(tables[sweep][learned])
        print(f"### S5: batch size per base lr (learned)\n\n{batch_table(batch_runs, pd.concat(metrics))}\n")
    print(f"### S3: lead-lag, first layer vs last block\n\n{lead_lag_table(settings)}\n")
    print(f"### S0: gradient spikes >= 10x the running median per layer (count, largest)\n\n"
          f"{ten_x_counts(settings)}\n")
    print(f"### S0/S3: first-layer spikes >= 10x and the last block after them\n\n{first_layer_spikes(all_runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
