#!/usr/bin/env bash
# The CPU sweeps behind docs/findings.md (S0-S6), in priority order: 44 runs, 5-22 min
# each, about 4 hours in all on 2 cores. The committed copy is data_samples/runs/findings.
# usage: bash experiments/findings_cpu.sh [OUT_DIR]   (default runs/findings)
# Tiny preset (ViT dim 128, depth 4, 8-px patches on 32-px images) on the committed
# 5,000-image CIFAR-10 sample, batch 128, 8 epochs = 312 steps, fresh-bank kNN every half
# epoch on the 1,000 held-out images. Two runs at a time, one thread each (2 cores).
# Rerunning the script skips finished runs and resumes interrupted ones.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/findings}"
# the committed runs were made with fp32 and the PIL workers pipeline at crop scale 0.08, the
# defaults of their day; as_made keeps a rerun the same experiment
as_made=(precision=fp32 data.pipeline=workers data.crop_min=0.08)
common=(--jobs 2 optim.epochs=8 optim.warmup_epochs=0.5 knn.full_every_epochs=0.5 log.progress=false "${as_made[@]}")

# S2 + S4 at the hot lr (peak 5e-2): every projection variant, 3 seeds
stabilitylab sweep --out "$out/variants_lr1e-1" --grid model.patch_proj=learned,frozen,batchnorm,weightnorm \
    --seeds 3 optim.base_lr=1e-1 "${common[@]}"
# S1 + S2 at the cooler lr (peak 5e-3): learned vs frozen, 3 seeds
stabilitylab sweep --out "$out/variants_lr1e-2" --grid model.patch_proj=learned,frozen \
    --seeds 3 optim.base_lr=1e-2 "${common[@]}"
# S4 clipping: a threshold far below the projection's gradient norm (1e-9: under AdamW's
# eps the update vanishes, ~frozen) and one far above it (1: clips only spikes, ~learned)
stabilitylab sweep --out "$out/clip_lr1e-1" --grid model.patch_proj_clip=1e-9,1 \
    --seeds 1 model.patch_proj=clip optim.base_lr=1e-1 "${common[@]}"
# S6 LAMB at the same two lrs (AdamW's runs are above)
stabilitylab sweep --out "$out/lamb" --grid optim.base_lr=1e-2,1e-1 \
    --seeds 3 optim.name=lamb "${common[@]}"
# S1 + S2 at a hotter lr still (peak 1.5e-1): learned vs frozen, 3 seeds
stabilitylab sweep --out "$out/variants_lr3e-1" --grid model.patch_proj=learned,frozen \
    --seeds 3 optim.base_lr=3e-1 "${common[@]}"
# S5 bigger batch at base lr 1e-2, lr scaled by the linear rule (peak 2e-2 and 4e-2), the same
# 8 epochs (72 and 32 steps); batch 128 (peak 5e-3) is the learned half of variants_lr1e-2
stabilitylab sweep --out "$out/batch_lr1e-2" --grid optim.batch_size=512,1024 \
    --seeds 3 model.patch_proj=learned optim.base_lr=1e-2 "${common[@]}"
# S5 at about equal steps: batch 512 for 35 epochs = 315 steps, as long as the batch-128 runs
# (312), at the cool and the hot base lr (peak 2e-2 and 2e-1; batch 128 had 5e-3 and 5e-2)
for lr in 1e-2 1e-1; do
    stabilitylab sweep --out "$out/batch512_long_lr$lr" --grid optim.batch_size=512 --seeds 3 --jobs 2 \
        model.patch_proj=learned optim.base_lr=$lr optim.epochs=35 optim.warmup_epochs=2 \
        knn.full_every_epochs=2 log.progress=false "${as_made[@]}"
done
