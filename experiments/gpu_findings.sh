#!/usr/bin/env bash
# Compact S0-S3 (docs/findings.md) on one GPU in under 10 minutes.
# usage: bash experiments/gpu_findings.sh [CIFAR10_IMAGEFOLDER_DIR]
# The folder needs train/<class>/*.jpg and test/<class>/*.jpg (../shared/datasets/cifar10 here;
# copy it into an ignored folder of the checkout, e.g. .gpu_data/cifar10, to take it to a GPU box).
set -euo pipefail
cd "$(dirname "$0")/.."
data="${1:-.gpu_data/cifar10}"
out="${OUT:-runs}/gpu_findings"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
PYTHONUNBUFFERED=1 python3 experiments/gpu_findings.py --data "$data" --val-split test --out "$out"
