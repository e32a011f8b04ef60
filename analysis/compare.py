"""Many runs side by side: one row per run, and the paper's Figure 6 grid."""
from __future__ import annotations

import difflib

import pandas as pd

from .summary import summarize_run

METRICS = ["knn_source", "final_top1", "best_top1", "linear_top1", "n_dips", "deepest_dip", "dip_area",
           "roughness", "n_first_layer_spikes", "n_spikes", "first_peak_ratio", "last_peak_ratio",
           "first_leads_frac", "final_loss"]
SPREAD_METRICS = ["final_top1", "best_top1", "linear_top1", "n_dips", "deepest_dip", "dip_area", "roughness",
                  "n_first_layer_spikes", "n_spikes", "first_peak_ratio", "last_peak_ratio", "final_loss"]
# How `display_table` shows each metric: (factor, decimals). Top-1 (kNN and linear), dip depths
# and dip area in percent (points; dip area in points x epochs), roughness in points; counts as
# integers (decimals None), their means over seeds to one decimal.
DISPLAY = {"final_top1": (100, 1), "best_top1": (100, 1), "linear_top1": (100, 1), "deepest_dip": (100, 1),
           "dip_area": (100, 2), "roughness": (100, 1), "n_dips": (1, None), "n_first_layer_spikes": (1, None),
           "n_spikes": (1, None), "first_peak_ratio": (1, 1), "last_peak_ratio": (1, 1), "first_leads_frac": (1, 2),
           "final_loss": (1, 4)}


DEFAULT_BY = "model.patch_proj"  # the variant column of a comparison, when the runs have it


class UnknownKeyError(ValueError):
    """A config key that no run has, e.g. a mistyped `compare --by`."""

    user_error = True  # the CLI prints it as one line and exits 2


def config_table(runs) -> pd.DataFrame:
    """Each run's config flattened to dotted columns ("optim.base_lr"), one row per run."""
    return pd.json_normalize([run.config or {} for run in runs], sep=".")


# Config keys of how a run was executed or logged, not of its setting: two seeds of one
# setting, one launched with a progress bar or a newer trainer's heap setting, stay one
# setting. `threads` (and on a CPU `data.num_workers`, when threads is unset) do change the
# float summation order, so runs that differ in them are not bitwise copies of each other
# (meta.json records the thread count used). Ask for a key (compare_runs(by=...),
# setting_labels(keys=...)) to see it.
RUNTIME_KEYS = frozenset({
    "threads", "keep_heap", "flush_denormal", "log.progress", "log.flush_every_steps", "log.flush_every_s",
    "checkpoint.every_steps", "checkpoint.keep", "checkpoint.keep_spikes", "data.num_workers", "data.cache_dir"})


def varied_keys(config: pd.DataFrame, *, exclude=()) -> list[str]:
    """The columns of a `config_table` whose value differs between the runs (compared as
    text, so lists and None count), minus `exclude` and the `RUNTIME_KEYS`."""
    return [c for c in config.columns
            if c not in exclude and c not in RUNTIME_KEYS and config[c].astype(str).nunique() > 1]


def compare_runs(runs, *, by=None, **summary_kwargs) -> pd.DataFrame:
    """One row per run: its name, the config values that tell runs apart, and its metrics.

    by: dotted config key(s) always included (a str or a list), e.g. "model.patch_proj";
        default "model.patch_proj" when some run's config has it (runs imported from
        elsewhere may have no such key).
    Config columns are `by` plus every dotted key whose value differs between the runs
    (e.g. "optim.base_lr", "optim.batch_size", "optim.name"), the `RUNTIME_KEYS` aside. Metric columns are those of
    `summarize_run` (see METRICS): final/best kNN top-1 from `knn_source` ('val' when
    present, else 'queue'), linear_top1 (the linear probe of the last probed checkpoint,
    official protocol first; None for a run never probed), n_dips, deepest_dip, dip_area
    (top-1 x epochs), roughness (sum of the falls between consecutive kNN evaluations),
    n_first_layer_spikes, n_spikes (spike events in any layer), first_peak_ratio /
    last_peak_ratio (largest gradient norm over its running median), first_leads_frac and
    final_loss, as fractions (`display_table` shows them in percent and points).
    summary_kwargs go to `summarize_run` (e.g. rule=). A `by` key that no run's config has
    raises UnknownKeyError.
    """
    runs = list(runs)
    config = config_table(runs)
    if by is None:
        by = [key for key in [DEFAULT_BY] if key in config.columns]
    by = [by] if isinstance(by, str) else list(by)
    if unknown := [k for k in by if k not in config.columns]:
        close = difflib.get_close_matches(unknown[0], config.columns, n=3)
        hint = (f"did you mean {' or '.join(close)}?" if close
                else "give dotted config.yaml keys, e.g. model.patch_proj")
        raise UnknownKeyError(f"no run's config has {', '.join(unknown)} ({hint})")
    config = config.reindex(columns=by + varied_keys(config, exclude=by))
    summaries = [summarize_run(r, **summary_kwargs) for r in runs]
    for s in summaries:  # spike events in any layer
        s["n_spikes"] = sum(s["spikes"].values()) if s.get("spikes") else None
    metrics = pd.DataFrame(summaries).reindex(columns=METRICS)
    return pd.concat([pd.DataFrame({"run": [r.name for r in runs]}), config, metrics], axis=1)


def display_table(compare_df: pd.DataFrame) -> pd.DataFrame:
    """`compare_runs` or `seed_spread` output in the display units of every surface (the CLI's
    text, CSV and JSON, the HTML report): top-1, dip depths and dip area in percent (dip area
    in points x epochs), roughness in points, all rounded (see DISPLAY); counts as integers,
    their means and standard deviations over seeds to one decimal. Column names are kept;
    other columns are left as they are, except the linear-probe columns, which are left out
    where no run was probed (`stabilitylab linprobe`)."""
    empty = [c for c in compare_df.columns if c.startswith("linear_top1") and compare_df[c].isna().all()]
    out = compare_df.drop(columns=empty)
    for column in out.columns:
        metric = next((m for m in DISPLAY if column in (m, f"{m}_mean", f"{m}_std")), None)
        if metric is None:
            continue
        factor, decimals = DISPLAY[metric]
        values = pd.to_numeric(out[column], errors="coerce") * factor
        if decimals is None and column == metric:
            out[column] = values.round().astype("Int64")
        else:
            out[column] = values.round(1 if decimals is None else decimals)
    return out


def figure6_table(compare_df: pd.DataFrame, variant="model.patch_proj", lr="optim.base_lr",
                  value="final_top1") -> pd.DataFrame:
    """Pivot `compare_runs` output to variant x learning rate (Chen et al. 2021, Figure 6).

    Cells hold `value` (e.g. "final_top1" or "linear_top1", the paper's number), averaged
    over the runs that share a cell (e.g. seeds) and have it; a cell no run has is NaN.
    """
    values = compare_df.assign(**{value: pd.to_numeric(compare_df[value], errors="coerce")})
    return values.pivot_table(index=variant, columns=lr, values=value, aggfunc="mean", dropna=False)


def seed_spread(compare_df: pd.DataFrame, *, seed="seed", metrics=None) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds of each setting of `compare_runs` output.

    A setting is one combination of the config columns: every column but "run", `seed`,
    the METRICS and `metrics` (which may name extra columns added to the frame). Columns:
    the setting's config values, n_seeds, then METRIC_mean and METRIC_std for each of
    `metrics` (default SPREAD_METRICS present in the frame). std is the sample standard
    deviation (NaN for a single seed).
    """
    metrics = [m for m in (SPREAD_METRICS if metrics is None else metrics) if m in compare_df]
    config = [c for c in compare_df.columns if c not in {"run", seed, *METRICS, *metrics}]
    frame = compare_df.copy()
    for c in config:  # group on printable values: lists / None would not group
        frame[c] = frame[c].astype(str)
    values = frame[metrics].apply(pd.to_numeric, errors="coerce")
    grouped = values.groupby([frame[c] for c in config], sort=False) if config else values.groupby(lambda _: "all")
    stats = grouped.agg(["mean", "std"])
    stats.columns = [f"{m}_{stat}" for m, stat in stats.columns]
    stats.insert(0, "n_seeds", grouped.size())
    return stats.reset_index(drop=not config)
