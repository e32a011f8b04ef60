#!/usr/bin/env bash
# Round 2 of docs/findings.md (issue 15): thousands of steps of a *learning* regime at the
# edge of stability, with the mechanism probes on. configs/cpu_edge.yaml: ViT width 64,
# depth 8, 4 heads, 8-px patches, batch 256, AdamW, 300 warmup steps then a constant lr,
# 3,000 steps on the full CIFAR-10 training split in ../shared/datasets/cifar10, fresh-bank
# kNN (10k bank, 5k held-out queries) every 100 steps, a checkpoint every 250 steps, fp32.
# A run is ~1.3 s a step on an idle core (~65 min); two at a time, one thread each.
# Rerunning the script skips finished runs and resumes interrupted ones.
# usage: EDGE=3.2e-2 bash experiments/findings2_cpu.sh [OUT_DIR]   (default runs/findings2)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/findings2}"
edge="${EDGE:-6.4e-2}"   # the R1 edge lr (docs/findings.md: learns slowly, first spikes)
C=(--config cpu_edge --jobs 2)

# Collapse: the tiny preset (the CPU default) at a cool and a hot lr for 4 epochs (156
# steps, ~3 min each), probes on: why round 1's hot runs stall (committed; ~20 min)
stabilitylab sweep --out "$out/collapse_tiny" --grid optim.base_lr=1e-2,1e-1 --seeds 3 --jobs 2 optim.epochs=4
# R1: the peak lr, one seed each (4e-3 is the smooth scouting run of the issue)
stabilitylab sweep --out "$out/r1_lr" --grid optim.base_lr=4e-3,8e-3,1.6e-2,3.2e-2 --seeds 1 "${C[@]}"
# R1, hotter: 6.4e-2 learns slowly with late spikes, 1.28e-1 stalls then breaks (seed 0 of
# each committed); the second seeds
stabilitylab sweep --out "$out/r1_lr_hot" --grid optim.base_lr=1.28e-1,6.4e-2 --seeds 2 "${C[@]}"
# their spikes replayed with each mitigation and a placebo (weight decay 0.1 -> 0.099)
stabilitylab replay "$out/r1_lr_hot/base_lr=6.4e-2_seed0" --at 2600 --steps 200 --with model.patch_proj=frozen \
    --with "optim.betas=[0.9,0.95]" --with optim.base_lr=3.2e-2 --with optim.weight_decay=0.099
stabilitylab replay "$out/r1_lr_hot/base_lr=1.28e-1_seed0" --at 1100 --steps 200 --with model.patch_proj=frozen \
    --with "optim.betas=[0.9,0.95]" --with optim.base_lr=6.4e-2 --with optim.weight_decay=0.099
# The controls from step 0 where the instability is (configs/cpu_unstable.yaml, peak lr 1.28e-1,
# 1,600 steps; its runs without a control are r1_lr_hot's 1.28e-1 seeds): a frozen patch
# projection, Adam beta2 0.95 and no warm-up (2 seeds each; ~50 min a run alone, 60-90 two at a time)
stabilitylab sweep --out "$out/r1_unstable_frozen" --config cpu_unstable --grid model.patch_proj=frozen --seeds 2 --jobs 2
stabilitylab sweep --out "$out/r1_unstable_beta2" --config cpu_unstable --grid optim.base_lr=1.28e-1 --seeds 2 \
    "optim.betas=[0.9,0.95]" --jobs 2
stabilitylab sweep --out "$out/r1_unstable_nowarmup" --config cpu_unstable --grid optim.warmup_steps=0 --seeds 2 --jobs 2
# R1 at the edge: seeds, and the controls (frozen projection, beta2 0.95, no warmup)
stabilitylab sweep --out "$out/r1_edge" --grid model.patch_proj=learned,frozen --seeds 2 \
    optim.base_lr="$edge" "${C[@]}"
stabilitylab sweep --out "$out/r1_edge_beta2" --grid optim.base_lr="$edge" --seeds 2 "optim.betas=[0.9,0.95]" "${C[@]}"
stabilitylab sweep --out "$out/r1_edge_nowarmup" --grid optim.warmup_steps=0 --seeds 2 optim.base_lr="$edge" "${C[@]}"
# R2: batch 1024 with the linear lr rule (peak lr = 4 x edge), 1,000 steps, AdamW vs LAMB
stabilitylab sweep --out "$out/r2_batch1024" --grid optim.name=adamw,lamb --seeds 2 \
    optim.batch_size=1024 optim.max_steps=1000 optim.base_lr="$edge" "${C[@]}"
# R2: LAMB with the LayerNorm gains and biases out of weight decay, 500 steps (~25 min a run
# alone; docs/findings.md has seed 1 so far)
stabilitylab sweep --out "$out/r2_lamb_nodecay" --grid optim.exclude_norm_bias_wd=true --seeds 2 \
    optim.batch_size=1024 optim.max_steps=500 optim.base_lr="$edge" optim.name=lamb "${C[@]}"
# R2: AdamW at batch 1024 with qk_norm (a LayerNorm on each head's q and k): does bounding the
# attention logits, which reach 1,000 before every break, keep the run learning? 1,000 steps,
# one run at a time (~50 min each alone)
stabilitylab sweep --out "$out/r2_qknorm" --grid model.qk_norm=true --seeds 2 --jobs 1 \
    optim.batch_size=1024 optim.max_steps=1000 optim.base_lr="$edge" --config cpu_edge
# R2: qk_norm at batch 1024 with the square-root lr rule (peak 0.128 = 2 x edge, where batch 256
# breaks too): is what remains of the break the linear rule's larger step? 1,000 steps, one at a time
stabilitylab sweep --out "$out/r2_qknorm_sqrt" --grid optim.base_lr=3.2e-2 --seeds 2 --jobs 1 \
    model.qk_norm=true optim.batch_size=1024 optim.max_steps=1000 --config cpu_edge
# its control without qk_norm (docs/findings.md has seed 0 to step 400, made with optim.max_steps=400; the sweep
# counts such a run as finished, so give the 1,000-step runs a fresh OUT_DIR)
stabilitylab sweep --out "$out/r2_sqrt" --grid optim.base_lr=3.2e-2 --seeds 2 --jobs 1 \
    optim.batch_size=1024 optim.max_steps=1000 --config cpu_edge
# R3: eps raised until the patch projection's median sqrt(v-hat) is 1-10x eps; read the
# medians first: python experiments/eps_regime.py "$out/r1_lr/base_lr=${edge}_seed0"
# (at ~2e-3 for the patch projection in the R1 runs, so eps 2e-4 ... 2e-3)
stabilitylab sweep --out "$out/r3_eps" --grid optim.eps=2e-4,1e-3 --seeds 2 optim.base_lr="$edge" "${C[@]}"
# R3 where the instability is (docs/findings.md has the prediction): eps 2e-4 puts the patch
# projection's sqrt(v-hat) (its gradient RMS at 1.28e-1: 4-7e-4) at 2-3x eps
stabilitylab sweep --out "$out/r3_unstable_eps" --config cpu_unstable --grid optim.eps=2e-4 --seeds 2 --jobs 2
# Precision: bf16 autocast at the edge and where the instability is. Only on a CPU with native
# bf16 (AVX512-BF16 / AMX) or a GPU: there a bf16 step is ~0.67x an fp32 one, without it ~6.6x
# (python benchmarks/bench_precision.py --edge; fp16 ~7-8x on both CPUs). The r1_unstable_bf16
# seeds of docs/findings.md ran one at a time (--jobs 1), ~27 minutes each on AVX512-BF16
stabilitylab sweep --out "$out/r1_unstable_bf16" --config cpu_unstable --grid precision=bf16 --seeds 2 --jobs 1
stabilitylab sweep --out "$out/precision" --grid precision=bf16 --seeds 2 optim.base_lr="$edge" "${C[@]}"
