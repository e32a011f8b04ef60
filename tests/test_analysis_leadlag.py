import numpy as np
import pandas as pd
import pytest

from analysis import LeadLagResult, spike_lead_lag
from analysis.leadlag import nearest_lags

N = 20_000
DT = 2  # logged every 2 steps


def norms(first_rows, last_rows, seed=0, n=N):
    """patch_embed, blocks.0 (quiet), predictor: lognormal norms with x30 spikes at given rows."""
    rng = np.random.default_rng(seed)
    x = np.exp(rng.normal(0, 0.1, (n, 3)))
    x[first_rows, 0] *= 30
    x[last_rows, 2] *= 30
    return pd.DataFrame(x, index=np.arange(n) * DT, columns=["patch_embed", "blocks.0", "predictor"])


def event_rows(count, seed, spacing=20):
    """`count` random rows on a grid of `spacing` rows, after a warmup."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(np.arange(200, N - 20, spacing), count, replace=False))


def test_first_layer_leading_by_a_known_lag():
    rows = event_rows(60, seed=1)
    assert spike_lead_lag(norms(rows, rows + 3)).last == "blocks.0"  # default: last ViT block
    result = spike_lead_lag(norms(rows, rows + 3), last="predictor")
    assert isinstance(result, LeadLagResult)
    last = result.per_layer.set_index("layer").loc["predictor"]
    assert last.n_first_events == 60 and last.n_layer_events == 60 and last.n_matched == 60
    assert last.median_lag == 3 * DT and last.mean_lag == 3 * DT
    assert last.frac_first_leads == 1.0
    assert last.xcorr_lag == 3 * DT
    assert (last.n_first_leads, last.n_first_follows) == (60, 0)
    assert last.association_p == pytest.approx(1 / 1000)  # no shift matches all 60
    assert last.direction_p == pytest.approx(0.5**60)  # 60 of 60 heads
    assert result.verdict == "first leads"
    assert "predictor" in result.summary and "patch_embed spikes lead" in result.summary
    quiet = result.per_layer.set_index("layer").loc["blocks.0"]
    assert quiet.n_layer_events == 0 and np.isnan(quiet.association_p) and np.isnan(quiet.direction_p)
    m = result.matches
    assert (m["layer_step"] - m["first_step"] == m["lag"]).all() and (m["lag"] == 3 * DT).all()


def test_precomputed_events_replace_detection():
    rows = event_rows(60, seed=1)
    frame = norms(rows, rows + 3)
    found = spike_lead_lag(frame, last="predictor")
    same = spike_lead_lag(frame, last="predictor", events=found.events)
    pd.testing.assert_frame_equal(same.per_layer, found.per_layer)
    # keep only the first 20 first-layer events: only their partners can be matched
    first = found.events[found.events["layer"] == "patch_embed"]
    kept = pd.concat([first.iloc[:20], found.events[found.events["layer"] != "patch_embed"]])
    fewer = spike_lead_lag(frame, last="predictor", events=kept).per_layer.set_index("layer").loc["predictor"]
    assert fewer.n_first_events == 20 and fewer.n_matched == 20 and fewer.median_lag == 3 * DT


def test_swapping_the_layers_flips_the_lag():
    rows = event_rows(60, seed=1)
    result = spike_lead_lag(norms(rows, rows + 3), first="predictor", layers=["patch_embed"])
    row = result.per_layer.iloc[0]
    assert row.median_lag == -3 * DT and row.xcorr_lag == -3 * DT
    assert row.frac_first_leads == 0.0 and (row.n_first_leads, row.n_first_follows) == (0, 60)
    assert row.association_p == pytest.approx(1 / 1000)  # as associated as before the swap
    assert row.direction_p == 1.0
    assert result.verdict == "not significant"


def test_independent_spike_trains_are_not_significant():
    result = spike_lead_lag(norms(event_rows(400, 2, spacing=3), event_rows(400, 3, spacing=1)),
                            last="predictor")
    row = result.per_layer.set_index("layer").loc["predictor"]
    assert row.n_matched > 50
    assert 0.3 < row.frac_first_leads < 0.7
    assert row.association_p > 0.05 and row.direction_p > 0.05
    assert result.verdict == "not significant"


def test_max_lag_limits_matching():
    rows = event_rows(60, seed=1)
    result = spike_lead_lag(norms(rows, rows + 3), max_lag=2 * DT, last="predictor")
    assert result.per_layer.set_index("layer").loc["predictor", "n_matched"] == 0
    assert result.verdict == "no matched spikes"


def test_no_events_and_missing_first_layer():
    result = spike_lead_lag(norms([], []))
    assert result.matches.empty and result.per_layer[["association_p", "direction_p"]].isna().all().all()
    assert "no spike events" in result.summary
    with pytest.raises(ValueError):
        spike_lead_lag(norms([], []), first="nope")


def test_nearest_lags():
    first = np.array([[10, 20, 40], [0, 30, 100]])
    lags = nearest_lags(first, np.array([13, 30, 35, 70]), max_lag=6)
    np.testing.assert_array_equal(lags[0], [3, np.nan, -5, np.nan])  # 30: tie 20/40 beyond 6
    np.testing.assert_array_equal(lags[1], [np.nan, 0, 5, np.nan])
    tie = nearest_lags(np.array([[10, 20]]), np.array([15]), max_lag=10)
    assert tie[0, 0] == -5  # a tie counts against "first leads"
    assert nearest_lags(np.zeros((2, 0)), np.array([1, 2]), 5).shape == (2, 2)


def test_per_layer_columns_are_the_documented_ones():
    result = spike_lead_lag(norms(event_rows(60, seed=1), event_rows(60, seed=1) + 3))
    assert list(result.per_layer.columns) == [
        "layer", "n_first_events", "n_layer_events", "n_matched", "n_first_leads", "n_first_follows",
        "frac_first_leads", "median_lag", "mean_lag", "xcorr_lag", "association_p", "direction_p"]


def test_same_step_spikes_are_associated_but_do_not_lead():
    rows = event_rows(60, seed=1)
    result = spike_lead_lag(norms(rows, rows), last="predictor")
    row = result.per_layer.set_index("layer").loc["predictor"]
    assert row.n_matched == 60 and row.median_lag == 0
    assert (row.n_first_leads, row.n_first_follows, row.frac_first_leads) == (0, 0, 0.0)
    assert row.association_p == pytest.approx(1 / 1000)
    assert np.isnan(row.direction_p)  # no pair has an order
    assert result.verdict == "not significant"


@pytest.mark.parametrize("lag_rows, matched", [(9, 60), (10, 60), (11, 0)])
def test_default_matching_window_is_ten_logging_intervals(lag_rows, matched):
    rows = event_rows(60, seed=1, spacing=40)
    result = spike_lead_lag(norms(rows, rows + lag_rows), last="predictor")
    assert result.max_lag == 10 * DT
    assert result.per_layer.set_index("layer").loc["predictor", "n_matched"] == matched


# The two nulls, each simulated 300 times on event trains (events= skips detection): the
# share of p < 0.05 is the false-positive rate, which must be near 0.05 (binomial sd 0.013).
REPS, ROWS = 300, 6000
FLAT = pd.DataFrame(1.0, index=np.arange(ROWS), columns=["patch_embed", "blocks.0"])


def trains(first, later) -> pd.DataFrame:
    return pd.DataFrame({"layer": ["patch_embed"] * len(first) + ["blocks.0"] * len(later),
                         "step": np.concatenate([first, later]).astype(int)})


def independent_trains(rng, n=150):
    return trains(*(np.sort(rng.choice(np.arange(100, ROWS), n, replace=False)) for _ in range(2)))


def coupled_trains(rng, sign=None, n=60):
    """Every later-layer spike 1..3 steps from a first-layer spike: after it (sign=+1),
    before it (-1), or on a random side (None: coupled, no lead)."""
    first = np.sort(rng.choice(np.arange(200, ROWS - 200, 20), n, replace=False))
    side = rng.choice([-1, 1], n) if sign is None else sign
    return trains(first, first + side * rng.integers(1, 4, n))


def simulate(make, reps=REPS) -> pd.DataFrame:
    rows = []
    for rep in range(reps):
        result = spike_lead_lag(FLAT, events=make(np.random.default_rng(rep)), n_permutations=199, seed=rep)
        rows.append({**result.per_layer.iloc[0].to_dict(), "verdict": result.verdict})
    return pd.DataFrame(rows)


def test_independent_trains_calibrate_both_tests():
    sim = simulate(independent_trains)
    assert sim["n_matched"].median() > 40  # dense enough for the sign test to reach 0.05
    assert 0.02 <= (sim["association_p"] < 0.05).mean() <= 0.09
    assert 0.02 <= (sim["direction_p"] < 0.05).mean() <= 0.09
    assert (sim["verdict"] == "first leads").mean() <= 0.09


def test_coupled_trains_without_lead_are_associated_but_not_leading():
    """The issue's held-out case: the old one-sided shift test said p < 0.05 in 100% and
    "first leads" in 46.5% of repetitions."""
    sim = simulate(coupled_trains)
    assert (sim["association_p"] < 0.05).mean() == 1.0
    assert 0.02 <= (sim["direction_p"] < 0.05).mean() <= 0.09
    assert (sim["verdict"] == "first leads").mean() <= 0.09


@pytest.mark.parametrize("sign, verdict", [(1, "first leads"), (-1, "not significant")])
def test_coupled_trains_with_a_lead_get_the_verdict_every_time(sign, verdict):
    sim = simulate(lambda rng: coupled_trains(rng, sign, n=12), reps=50)
    assert (sim["verdict"] == verdict).all()
