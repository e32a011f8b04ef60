"""Compact S0-S3 of docs/findings.md on one GPU, in under 10 minutes.

Learned vs frozen patch projection at three learning rates with a ViT-S-width model on
32-px CIFAR-10 (4-px patches, 64 tokens) at batch 1024, bf16; then per run: kNN dips,
first-layer spike events and the lead-lag test. Needs only torch, timm, numpy, pandas,
pyarrow and scipy (no omegaconf, plotly or faiss): the config is built from the trainer's
dataclasses directly and the run directories are written with stabilitylab's writer.

    python experiments/gpu_findings.py --data /path/to/cifar10 --val-split test --out runs/gpu_findings
    python experiments/gpu_findings.py --smoke      # a few CPU steps: checks the script runs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from analysis import find_knn_dips, find_spikes, spike_lead_lag  # noqa: E402
from stabilitylab.rundir import RunWriter, write_meta  # noqa: E402
from stabilitylab.run import load_run  # noqa: E402
from trainer.config import TrainConfig, resolve  # noqa: E402


def make_config(patch_proj: str, base_lr: float, args) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model.preset = "vit_small" if not args.smoke else "tiny"
    cfg.model.img_size, cfg.model.patch_size = 32, 4
    cfg.model.patch_proj = patch_proj
    if not args.smoke:
        cfg.model.head_hidden_dim, cfg.model.head_out_dim = 2048, 256
    cfg.optim.base_lr = base_lr
    cfg.optim.batch_size = args.batch
    cfg.optim.epochs = args.epochs
    cfg.optim.warmup_epochs = args.epochs / 10
    cfg.data.path = args.data
    cfg.data.val_split = args.val_split
    cfg.data.num_workers = args.workers
    cfg.knn.every = 10
    cfg.knn.val_size = 5000
    cfg.knn.full_every_epochs = max(1.0, args.epochs / 10)
    cfg.log.progress = False
    cfg.log.flush_every_s = 30
    cfg.checkpoint.every_steps = 10**9
    if args.smoke:
        cfg.optim.max_steps = 3
        cfg.knn.every = 1
        cfg.knn.full_every_epochs = 0
    return resolve(cfg)


def run_one(name: str, cfg: TrainConfig, out: Path) -> Path:
    from dataclasses import asdict

    import torch

    from trainer import train

    run_dir = out / name
    write_meta(run_dir, {"status": "running", "torch": torch.__version__,
                         "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"})
    (run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
    writer = RunWriter(run_dir, flush_every_steps=cfg.log.flush_every_steps, flush_every_s=cfg.log.flush_every_s)
    started = time.time()
    train(cfg, run_dir=run_dir, writer=writer)
    writer.close()
    writer.update_meta(status="finished", wall_s=round(time.time() - started, 1))
    return run_dir


def summarize(run_dir: Path) -> dict:
    run = load_run(run_dir)
    cfg = json.loads((run_dir / "config.json").read_text())
    knn = run.knn
    val = knn[knn["source"] == "val"]["top1"]
    dips = find_knn_dips(knn) if len(knn) else knn
    norms = run.grad_norms()
    row = {"patch_proj": cfg["model"]["patch_proj"], "base_lr": cfg["optim"]["base_lr"],
           "steps": len(run.steps), "final_val_top1": float(val.iloc[-1]) if len(val) else float("nan"),
           "dips": len(dips), "confirmed_dips": int(dips["confirmed"].fillna(False).sum()) if len(dips) else 0,
           "wall_s": run.meta.get("wall_s")}
    if "patch_embed" in norms.columns and len(norms) > 60:
        spikes = find_spikes(norms, "ratio:10")
        row["first_layer_spikes_10x"] = int((spikes["layer"] == "patch_embed").sum())
        row["max_first_layer_ratio"] = float((norms["patch_embed"] / norms["patch_embed"].rolling(100, 1).median().shift()).max())
        lead = spike_lead_lag(norms)
        last = lead.per_layer.set_index("layer").loc[lead.last]
        row.update(lead_verdict=lead.verdict, lead_association_p=float(last["association_p"]),
                   lead_direction_p=float(last["direction_p"]), lead_median_lag=float(last["median_lag"]))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / "data_samples" / "cifar10_small"),
                        help="ImageFolder root with train/ and val/ (default: the committed sample)")
    parser.add_argument("--val-split", default="val", help="held-out folder name (CIFAR-10 JPEGs: test)")
    parser.add_argument("--out", default=str(ROOT / "runs" / "gpu_findings"))
    parser.add_argument("--lrs", default="1.5e-4,5e-4,1.5e-3", help="base learning rates (x batch/256)")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--epochs", type=float, default=12)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="3 tiny CPU steps per run")
    args = parser.parse_args()
    if args.smoke:
        args.batch, args.workers, args.lrs = 16, 0, "1e-3"
    out = Path(args.out)
    rows = []
    for base_lr in map(float, args.lrs.split(",")):
        for patch_proj in ("learned", "frozen"):
            name = f"{patch_proj}_lr{base_lr:g}"
            if not (out / name / "meta.json").exists():
                print(f"training {name}", flush=True)
                run_one(name, make_config(patch_proj, base_lr, args), out)
            rows.append({"run": name, **summarize(out / name)})
    import pandas as pd

    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    table.to_csv(out / "summary.csv", index=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
