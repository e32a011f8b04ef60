"""Write the seed-band figures of docs/findings.md that span several sweeps of
experiments/findings_cpu.sh (the per-sweep ones come from `stabilitylab report --figures`).

usage: python experiments/findings_figures.py [OUT_DIR] [FIGURE_DIR]
       (default runs/findings and docs/figures)

s1_s2_knn_seeds             learned vs frozen at the three base lrs (batch 128)
s5_knn_seeds_same_epochs    batch 128 / 512 / 1024 at base lr 1e-2 over the same 8 epochs, by epoch
s5_knn_seeds_same_steps     batch 128 vs 512 over ~312 steps at base lr 1e-2 and 1e-1, by step
s6_knn_seeds                LAMB vs AdamW at base lr 1e-2 and 1e-1 (learned projection)
r1_knn_lr                   round 2, R1: the fresh-bank kNN of cpu_edge at every peak lr, 3,000 steps
r1_unstable_controls        round 2: peak lr 1.28e-1 (cpu_unstable) as it is, with a frozen patch
                            projection, beta2 0.95, eps 2e-4, bf16 autocast or no warm-up from step 0
r2_batch1024                round 2, R2: AdamW and LAMB at batch 1024 (linear lr rule) against AdamW
                            at batch 256 and the same base lr 6.4e-2, by epoch (= images seen),
                            and AdamW at batch 1024 with qk_norm, at that base lr and at half of it
                            (peak 0.128: the square-root rule), and its control without qk_norm
A figure whose sweeps are missing is skipped; finished and interrupted runs count (an
interrupted one shows how far it got).
"""
from __future__ import annotations

import argparse
from pathlib import Path

from stabilitylab.figures import knn_seeds_plot, save
from stabilitylab.run import load_runs

FIGURES = {
    "s1_s2_knn_seeds": dict(sweeps=["variants_lr1e-2", "variants_lr1e-1", "variants_lr3e-1"],
                            patch_proj=("learned", "frozen"), keys=["model.patch_proj", "optim.base_lr"]),
    "s5_knn_seeds_same_epochs": dict(sweeps=["variants_lr1e-2", "batch_lr1e-2"], patch_proj=("learned",),
                                     keys=["optim.batch_size"], x="epoch"),
    "s5_knn_seeds_same_steps": dict(sweeps=["variants_lr1e-2", "variants_lr1e-1", "batch512_long_lr1e-2",
                                            "batch512_long_lr1e-1"], patch_proj=("learned",),
                                    keys=["optim.batch_size", "optim.base_lr"], x="step"),
    "s6_knn_seeds": dict(sweeps=["variants_lr1e-2", "variants_lr1e-1", "lamb"], patch_proj=("learned",),
                         keys=["optim.name", "optim.base_lr"]),
    "r1_knn_lr": dict(sweeps=["r1_lr", "r1_lr_hot"], patch_proj=("learned",), keys=["optim.base_lr"], x="step"),
    "r1_unstable_controls": dict(sweeps=["r1_lr_hot", "r1_unstable_frozen", "r1_unstable_beta2", "r1_unstable_bf16",
                                         "r1_unstable_nowarmup", "r3_unstable_eps"],
                                 patch_proj=("learned", "frozen"), base_lr=(0.128,),
                                 keys=["model.patch_proj", "optim.betas", "optim.eps", "precision", "optim.warmup_steps"],
                                 x="step"),
    "r2_batch1024": dict(sweeps=["r1_lr_hot", "r2_batch1024", "r2_qknorm", "r2_qknorm_sqrt", "r2_sqrt"], patch_proj=("learned",),
                         base_lr=(0.064, 0.032), keys=["optim.name", "optim.batch_size", "model.qk_norm", "optim.base_lr"],
                         x="epoch",
                         predate={"model.qk_norm": False}),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", default="runs/findings")
    parser.add_argument("figures", nargs="?", default="docs/figures")
    args = parser.parse_args(argv)
    if not Path(args.out).is_dir():
        parser.error(f"{args.out} is not a folder: pass the folder that holds the sweeps (e.g. runs/findings)")
    Path(args.figures).mkdir(parents=True, exist_ok=True)
    written = 0
    for name, spec in FIGURES.items():
        folders = [Path(args.out) / sweep for sweep in spec["sweeps"]]
        if not all(folder.is_dir() for folder in folders):
            print(f"skip {name}: missing {', '.join(str(f) for f in folders if not f.is_dir())}")
            continue
        runs = [run for run in load_runs(folders) if run.meta.get("status") in ("finished", "interrupted")
                and run.config_value("model.patch_proj") in spec["patch_proj"]
                and run.config_value("optim.base_lr") in spec.get("base_lr", [run.config_value("optim.base_lr")])]
        for run in runs:  # keys that runs made before them lack, with the value those runs had
            for dotted, value in spec.get("predate", {}).items():
                section, key = dotted.split(".")
                run.config.setdefault(section, {}).setdefault(key, value)
        runs.sort(key=lambda run: [run.config_value(key) for key in spec["keys"]])  # legend order
        figure = knn_seeds_plot(runs, x=spec.get("x"), keys=spec["keys"])
        for path in save(figure, Path(args.figures) / name, formats=["png"]):
            print(path)
            written += 1
    if not written:
        parser.error(f"no figure written: none has all its sweeps under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
