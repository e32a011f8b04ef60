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
    assert last.p_value == pytest.approx(1 / 1000)
    assert result.verdict == "first leads"
    assert "predictor" in result.summary and "patch_embed spikes lead" in result.summary
    quiet = result.per_layer.set_index("layer").loc["blocks.0"]
    assert quiet.n_layer_events == 0 and np.isnan(quiet.p_value)
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
    assert row.frac_first_leads == 0.0
    assert row.p_value > 0.5
    assert result.verdict == "not significant"


def test_independent_spike_trains_are_not_significant():
    result = spike_lead_lag(norms(event_rows(400, 2, spacing=3), event_rows(400, 3, spacing=1)),
                            last="predictor")
    row = result.per_layer.set_index("layer").loc["predictor"]
    assert row.n_matched > 50
    assert 0.3 < row.frac_first_leads < 0.7
    assert row.p_value > 0.05
    assert result.verdict == "not significant"


def test_max_lag_limits_matching():
    rows = event_rows(60, seed=1)
    result = spike_lead_lag(norms(rows, rows + 3), max_lag=2 * DT, last="predictor")
    assert result.per_layer.set_index("layer").loc["predictor", "n_matched"] == 0
    assert result.verdict == "no matched spikes"


def test_no_events_and_missing_first_layer():
    result = spike_lead_lag(norms([], []))
    assert result.matches.empty and result.per_layer["p_value"].isna().all()
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
