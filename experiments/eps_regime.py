"""R3 of docs/findings.md: how large AdamW's eps must be to reach the layers' sqrt(v-hat).

usage: python experiments/eps_regime.py RUN_DIR [RUN_DIR ...] [--steps 249,999,2999]

Molybog et al. (2023) tie Adam's loss spikes to layers whose second-moment estimate is so
small that eps takes part in the update: sqrt(v-hat) within 1-10x of eps. The
optimizer-state probe logs only the share of entries with sqrt(v-hat) < 10 eps
(`adam_small_v_frac`) at the run's own eps; this script reads the checkpoints' Adam state
and prints, per layer group, the median sqrt(v-hat) (bias-corrected) and so the eps range
[median / 10, median] that puts that layer into the regime.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from stabilitylab.config import config_from_run
from trainer.checkpoint import list_checkpoints, load_checkpoint
from trainer.methods import build_method
from trainer.optim import build_optimizer
from trainer.probes import named_grouping
from trainer.schedules import scaled_lr


def median_sqrt_v(run_dir: Path, checkpoint) -> dict[str, float]:
    """Per layer group: the median over its entries of sqrt(v-hat) at that checkpoint."""
    cfg = config_from_run(run_dir)
    model = build_method(cfg)
    optimizer = build_optimizer(model, cfg.optim, scaled_lr(cfg.optim.base_lr, cfg.optim.batch_size),
                                torch.device("cpu"))
    state = load_checkpoint(checkpoint)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    beta2 = cfg.optim.betas[1]
    grouping, named = named_grouping(model)
    out = {}
    for group, params in grouping.groups:
        values = []
        for name in params:
            s = optimizer.state.get(named[name], {})
            if "exp_avg_sq" not in s:
                continue
            correction = 1 - beta2 ** float(s["step"])
            values.append((s["exp_avg_sq"] / correction).sqrt().flatten())
        if values:
            out[group] = float(torch.cat(values).median())
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="example: python experiments/eps_regime.py "
                                            "runs/findings2/r1_lr/base_lr=8e-3_seed0 --steps 249,2999")
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--steps", default=None,
                        help="comma-separated checkpoint steps (default: every checkpoint)")
    args = parser.parse_args(argv)
    wanted = None if args.steps is None else {int(s) for s in args.steps.split(",")}
    for run_dir in args.runs:
        checkpoints = [c for c in list_checkpoints(run_dir) if wanted is None or c.step in wanted]
        if not checkpoints:
            parser.error(f"{run_dir} has no checkpoint{'' if wanted is None else ' at ' + args.steps}")
        rows = {c.step: median_sqrt_v(run_dir, c) for c in checkpoints}
        groups = list(next(iter(rows.values())))
        print(f"### {run_dir}: median sqrt(v-hat) per group (eps in the regime: median/10 ... median)\n")
        print("| step | " + " | ".join(groups) + " |\n|---|" + "---|" * len(groups))
        for step, medians in rows.items():
            print(f"| {step} | " + " | ".join(f"{medians.get(g, np.nan):.2g}" for g in groups) + " |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
