"""The run-summary metrics on short known sequences, computed by hand: final_loss, roughness
and dip_area of `summarize_run` (docs/analysis.md, "Run summary"), and the display units of
`display_table`."""
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from analysis import compare_runs, display_table, seed_spread, summarize_run
from analysis.compare import UnknownKeyError


@dataclass
class KnownRun:
    """The attributes `summarize_run` reads, with no per-layer norms."""

    steps: pd.DataFrame
    knn: pd.DataFrame
    name: str = "known"
    config: dict = field(default_factory=lambda: {"model": {"patch_proj": "learned"}, "seed": 0})
    meta: dict = field(default_factory=lambda: {"status": "finished"})
    layers: pd.DataFrame = field(default_factory=pd.DataFrame)

    def grad_norms(self):
        return pd.DataFrame()


def val_knn(top1, every=100, epochs_per_step=0.02, n_queries=10_000) -> pd.DataFrame:
    step = np.arange(1, len(top1) + 1) * every
    return pd.DataFrame({"step": step, "epoch": step * epochs_per_step, "source": "val", "k": 20,
                         "top1": top1, "top5": top1, "bank_size": 5000, "n_queries": n_queries})


def losses(values) -> pd.DataFrame:
    return pd.DataFrame({"step": np.arange(len(values)), "loss": values})


def test_final_loss_is_the_mean_of_the_last_100_finite_losses():
    loss = np.arange(300, dtype=float)
    loss[250] = np.nan
    loss[260] = np.inf
    s = summarize_run(KnownRun(losses(loss), val_knn([0.5] * 5)))
    last_100 = list(range(198, 250)) + list(range(251, 260)) + list(range(261, 300))  # 100 values
    assert len(last_100) == 100
    assert s["final_loss"] == pytest.approx(sum(last_100) / 100)


def test_roughness_sums_the_falls_between_evaluations():
    s = summarize_run(KnownRun(losses([1.0] * 10), val_knn([0.1, 0.3, 0.2, 0.4, 0.35, 0.5])))
    assert s["roughness"] == pytest.approx(0.1 + 0.05)  # the two falls; rises do not count
    assert (s["final_top1"], s["best_top1"]) == (0.5, 0.5)


def test_dip_area_is_top1_times_epochs():
    """A flat 0.5 curve (noise 0.005) every 100 steps with a 0.1-deep, 3-evaluation dip:
    trapezoids over steps 400-800 give 30 top-1 x steps, at 0.02 epochs per step 0.6."""
    top1 = [0.5] * 12
    top1[4:7] = [0.4] * 3  # steps 500, 600, 700
    s = summarize_run(KnownRun(losses([1.0] * 10), val_knn(top1)))
    assert s["n_dips"] == 1 and s["deepest_dip"] == pytest.approx(0.1)
    assert s["dip_area"] == pytest.approx((0.05 + 0.1 + 0.1 + 0.05) * 100 * 0.02)


def test_display_table_shows_percent_points_and_whole_counts():
    curves = [[0.1, 0.3, 0.2, 0.4, 0.35, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.45]]
    runs = [KnownRun(losses([1.0 + seed] * 10), val_knn(top1), name=f"s{seed}",
                     config={"model": {"patch_proj": "learned"}, "seed": seed}) for seed, top1 in enumerate(curves)]
    raw = compare_runs(runs)
    assert raw["final_top1"].tolist() == [0.5, 0.45]  # compare_runs keeps fractions
    shown = display_table(raw)
    assert shown["final_top1"].tolist() == [50.0, 45.0]
    assert shown["roughness"].tolist() == [15.0, 5.0]  # points
    assert str(shown["n_dips"].dtype) == "Int64" and shown["n_dips"].tolist() == [1, 0]
    assert shown["deepest_dip"].tolist() == [5.0, 0.0]  # 0.4 -> 0.35: 5 points
    assert shown["dip_area"].tolist() == [10.0, 0.0]  # points x epochs
    assert shown["n_spikes"].isna().all()  # no per-layer norms in these runs
    assert shown["final_loss"].tolist() == [1.0, 2.0]
    spread = display_table(seed_spread(raw))
    assert spread["final_top1_mean"].iloc[0] == 47.5 and spread["n_seeds"].iloc[0] == 2
    assert spread["roughness_std"].iloc[0] == pytest.approx(7.1)  # sd of 15 and 5, 1 decimal
    assert spread["n_dips_mean"].iloc[0] == 0.5


def test_an_unknown_by_key_is_an_error():
    run = KnownRun(losses([1.0] * 10), val_knn([0.5] * 5))
    with pytest.raises(UnknownKeyError, match="no run's config has model.patch_prj .did you mean model.patch_proj"):
        compare_runs([run], by="model.patch_prj")


def test_runs_without_the_default_variant_key_compare():
    """Runs imported from elsewhere may have no model.patch_proj: the default `by` then adds
    no column instead of failing; a `by` the user names must exist."""
    bare = KnownRun(losses([1.0] * 10), val_knn([0.5] * 5), name="imported", config={})
    assert list(compare_runs([bare]).columns[:2]) == ["run", "knn_source"]
    with pytest.raises(UnknownKeyError):
        compare_runs([bare], by="model.patch_proj")
