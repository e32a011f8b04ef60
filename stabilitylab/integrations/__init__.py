"""Callbacks that put `stabilitylab.Monitor` into other frameworks' training loops.

- `stabilitylab.integrations.lightning.StabilityMonitor`: PyTorch Lightning
  (`pip install 'stabilitylab[lightning]'`).
- `stabilitylab.integrations.huggingface.StabilityCallback`: the Hugging Face `Trainer`
  (`pip install 'stabilitylab[huggingface]'`).

Each module imports its framework, so import the one you use.
"""
from __future__ import annotations

from typing import Mapping, Sequence


def curve_names(metrics: Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """{metric: curve name} from a callback's `metrics`: names (each curve named after its
    metric) or a mapping."""
    return dict(metrics) if isinstance(metrics, Mapping) else {m: m for m in metrics}


def log_curves(monitor, step: int, values: Mapping | None, curves: Mapping[str, str], **fields) -> None:
    """Log each metric of `curves` that `values` holds as a kNN-style curve at `step`
    (an accuracy in 0-1; `fields` such as epoch go along)."""
    for metric, source in curves.items():
        value = (values or {}).get(metric)
        if value is not None:
            monitor.log_knn(max(step, 0), top1=float(value), source=source, **fields)
