"""Training-stability analysis of run data: dips, spikes, lead-lag, precursors, linear probes,
run comparison.

Pure pandas / numpy / scipy: plain DataFrames and Series in, DataFrames and dicts out.
Never imports torch, trainer or stabilitylab; a run is anything with the attributes of
`stabilitylab.run.Run` (name, config, meta, steps, layers, knn, events, grad_norms(); `linear`
optional: a run without it reads as never linear-probed).
Methods and defaults: docs/analysis.md.
"""
from .compare import RUNTIME_KEYS, compare_runs, config_table, display_table, figure6_table, seed_spread, varied_keys
from .dips import find_dips, find_knn_dips, knn_curves
from .leadlag import LeadLagResult, spike_lead_lag
from .linear import linear_curve, linear_summary
from .noise import binomial_noise, curve_noise, robust_noise
from .precursors import precursor_table, run_signals, signal_onsets
from .spikes import DEFAULT_RULE, SpikeRule, causal_median, find_spikes, peak_ratio, running_ratio
from .summary import format_summary, summarize_run

__all__ = ["find_dips", "find_knn_dips", "knn_curves", "find_spikes", "spike_lead_lag", "LeadLagResult",
           "peak_ratio", "running_ratio", "causal_median", "SpikeRule", "DEFAULT_RULE",
           "compare_runs", "display_table", "config_table", "varied_keys", "RUNTIME_KEYS", "figure6_table",
           "seed_spread",
           "summarize_run", "format_summary", "binomial_noise", "robust_noise", "curve_noise",
           "linear_summary", "linear_curve", "run_signals", "signal_onsets", "precursor_table"]
