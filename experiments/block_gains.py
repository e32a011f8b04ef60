"""Print the LayerNorm gains in front of each block's two branches, from a run's checkpoints.

usage: python experiments/block_gains.py RUN_DIR [RUN_DIR ...]   (every checkpoint of each run)

A pre-norm ViT block adds attn(norm1(x)) and mlp(norm2(x)) to the residual stream; a gain
(`norm1.weight`, `norm2.weight`, 1 at init) near 0 switches that branch off, and every
gradient into the branch is multiplied by it. docs/findings.md (R2) reads these to explain the
subnormal gradients of the collapsed LAMB runs. With `model.qk_norm=true` the gains of each
head's query and key LayerNorms follow (their product times sqrt(d_head) bounds the attention
logits). One row per checkpoint and gain: its RMS in each block of the online backbone, and
how many blocks have it below OFF.
Checkpoints are not committed with the sample runs, so this reads runs trained anew.
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from trainer.checkpoint import list_checkpoints, load_checkpoint

GAIN = re.compile(r"backbone\.blocks\.(\d+)\.(norm1|norm2|attn\.q_norm|attn\.k_norm)\.weight")
BRANCH = {"norm1": "attention", "norm2": "MLP", "attn.q_norm": "query (qk_norm)", "attn.k_norm": "key (qk_norm)"}
OFF = 1e-3  # a gain's RMS below this scales the branch's output and gradients by < 1/1,000


def gain_rows(run_dir: Path) -> list[tuple[int, str, list[float]]]:
    """(step, branch, the gain's RMS per block) for every checkpoint of `run_dir` and gain it has."""
    rows = []
    for checkpoint in list_checkpoints(run_dir):
        model = load_checkpoint(checkpoint)["model"]
        gains = {(int(m.group(1)), m.group(2)): value.float().pow(2).mean().sqrt().item()
                 for name, value in model.items() if (m := GAIN.fullmatch(name))}
        depth = 1 + max(block for block, _ in gains)
        rows += [(checkpoint.step, branch, [gains[block, norm] for block in range(depth)])
                 for norm, branch in BRANCH.items() if (0, norm) in gains]
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with checkpoints")
    args = parser.parse_args(argv)
    rows = []
    for run_dir in args.runs:
        found = gain_rows(run_dir)
        if not found:
            parser.error(f"{run_dir} has no checkpoint: pass a run directory with a checkpoints/ folder")
        rows += [(run_dir.name, *row) for row in found]
    depth = max(len(values) for *_, values in rows)
    print("| run | step | branch | " + " | ".join(f"blocks.{i}" for i in range(depth)) + f" | blocks under {OFF:g} |")
    print("|---|---|---|" + "---|" * (depth + 1))
    for run, step, branch, values in rows:
        print(f"| {run} | {step} | {branch} | " + " | ".join(f"{v:.1e}" for v in values)
              + f" | {sum(v < OFF for v in values)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
