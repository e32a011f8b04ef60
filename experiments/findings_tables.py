"""Print the Markdown tables of docs/findings.md from the sweeps of experiments/findings_cpu.sh.

usage: python experiments/findings_tables.py [OUT_DIR]   (default runs/findings)

Per sweep: mean +- sd over seeds of the kNN and gradient-excursion metrics (S0, S1, S4, S6);
frozen - learned final kNN per lr with its standard error (S2); the lead-lag test of every
learned-projection run at the default spike threshold and at a looser exploratory one (S3).
Sweeps not run yet are skipped.
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from analysis import compare_runs, find_spikes, seed_spread, spike_lead_lag
from stabilitylab.run import is_run_dir, load_runs

# sweep folder -> the config keys that name its settings
SWEEPS = {"variants_lr1e-1": ["model.patch_proj", "optim.base_lr"],
          "variants_lr1e-2": ["model.patch_proj", "optim.base_lr"],
          "clip_lr1e-1": ["model.patch_proj_clip", "optim.base_lr"],
          "lamb": ["optim.name", "optim.base_lr"]}
EXPLORATORY_Z = 4.0


def pm(mean, std, scale=1.0, digits=1) -> str:
    if mean is None or pd.isna(mean):
        return "—"
    text = f"{scale * mean:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {scale * std:.{digits}f}"


def spread_table(table: pd.DataFrame, by: list[str]) -> str:
    spread = seed_spread(table)
    config = [c for c in spread.columns if c in by]
    rows = ["| " + " | ".join([c.split(".")[-1] for c in config] + [
        "seeds", "final kNN %", "best kNN %", "dips", "deepest dip (pts)", "roughness (pts)",
        "first-layer peak / median", "last-block peak / median"]) + " |",
            "|" + "---|" * (len(config) + 8)]
    for _, r in spread.iterrows():
        rows.append("| " + " | ".join([str(r[c]) for c in config] + [
            str(r["n_seeds"]), pm(r.final_top1_mean, r.final_top1_std, 100),
            pm(r.best_top1_mean, r.best_top1_std, 100), pm(r.n_dips_mean, r.n_dips_std),
            pm(r.deepest_dip_mean, r.deepest_dip_std, 100), pm(r.roughness_mean, r.roughness_std, 100),
            pm(r.first_peak_ratio_mean, r.first_peak_ratio_std), pm(r.last_peak_ratio_mean, r.last_peak_ratio_std)])
            + " |")
    return "\n".join(rows)


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


def lead_lag_table(runs) -> str:
    rows = ["| run | z | first-layer events | last-block events | matched | first leads | median lag | xcorr lag | p |",
            "|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        if (run.config or {}).get("model", {}).get("patch_proj") == "frozen" or not len(run.layers):
            continue
        for z in (6.0, EXPLORATORY_Z):
            ll = spike_lead_lag(run.grad_norms(), threshold=z)
            r = ll.per_layer.set_index("layer").loc[ll.last]
            rows.append(f"| {run.path.parent.name}/{run.name} | {z:g} | {r.n_first_events:.0f} | "
                        f"{r.n_layer_events:.0f} | {r.n_matched:.0f} | "
                        f"{'—' if pd.isna(r.frac_first_leads) else f'{r.frac_first_leads:.2f}'} | "
                        f"{'—' if pd.isna(r.median_lag) else f'{r.median_lag:+.0f}'} | {r.xcorr_lag:+.0f} | "
                        f"{'—' if pd.isna(r.p_value) else f'{r.p_value:.3f}'} |")
    return "\n".join(rows)


def ten_x_events(runs) -> str:
    """Every spike of >= 10x its running median (method 'ratio'), any layer, any run."""
    rows = ["| run | layer | step | norm / running median |", "|---|---|---|---|"]
    for run in runs:
        if len(run.layers):
            for e in find_spikes(run.grad_norms(), method="ratio").itertuples():
                rows.append(f"| {run.path.parent.name}/{run.name} | {e.layer} | {e.peak_step} | {e.score:.1f} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/findings")
    args = parser.parse_args(argv)
    variant_tables, all_runs = [], []
    for sweep, by in SWEEPS.items():
        folder = Path(args.out) / sweep
        if not folder.is_dir() or not any(is_run_dir(p) for p in folder.iterdir()):
            continue
        runs = load_runs([folder])
        all_runs += runs
        table = compare_runs(runs, by=by)
        if sweep.startswith("variants"):
            variant_tables.append(table)
        print(f"### {sweep} ({len(runs)} runs)\n\n{spread_table(table, by)}\n")
    if variant_tables:
        print(f"### S2: frozen vs learned\n\n{frozen_gain(variant_tables)}\n")
    print(f"### S3: lead-lag, first layer vs last block\n\n{lead_lag_table(all_runs)}\n")
    print(f"### S0: gradient spikes >= 10x the running median, any layer, {len(all_runs)} runs\n\n"
          f"{ten_x_events(all_runs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
