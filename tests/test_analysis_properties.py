"""Invariances that must hold for any input, checked with hypothesis."""
import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from analysis import find_dips, find_spikes, spike_lead_lag

FAST = settings(max_examples=25, deadline=None)


@st.composite
def spiky_norms(draw, n=600):
    """Lognormal norms with a few x5..x100 spikes, on steps 0, every, 2*every, ..."""
    seed = draw(st.integers(0, 2**32 - 1))
    every = draw(st.integers(1, 10))
    rng = np.random.default_rng(seed)
    x = np.exp(rng.normal(0, draw(st.floats(0.01, 0.5)), n))
    rows = rng.choice(n, draw(st.integers(0, 8)), replace=False)
    x[rows] *= rng.uniform(5, 100, len(rows))
    return pd.Series(x, index=np.arange(n) * every, name="patch_embed")


@FAST
@given(spiky_norms(), st.integers(-20, 20), st.sampled_from(["mad:6", "ratio:10", "mad:6+ratio:3|ratio:10"]))
def test_scaling_a_norm_series_keeps_the_spike_steps(x, power, rule):
    scaled = x * 2.0**power
    steps = ["step", "peak_step", "end_step", "n_steps"]
    pd.testing.assert_frame_equal(find_spikes(x, rule)[steps], find_spikes(scaled, rule)[steps])


@FAST
@given(spiky_norms(), st.integers(-10**6, 10**6), st.sampled_from(["mad:6", "sigma:7", "ratio:10", "mad:6+ratio:3|ratio:10"]))
def test_shifting_steps_shifts_every_spike_step(x, shift, rule):
    moved = x.set_axis(x.index + shift)
    a, b = find_spikes(x, rule), find_spikes(moved, rule)
    for col in ("step", "peak_step", "end_step"):
        np.testing.assert_array_equal(a[col] + shift, b[col])
    np.testing.assert_allclose(a["score"], b["score"])


@FAST
@given(spiky_norms(), spiky_norms(), st.integers(-10**6, 10**6))
def test_shifting_steps_shifts_lead_lag_matches(first, last, shift):
    frame = pd.DataFrame({"patch_embed": first.to_numpy(), "predictor": last.to_numpy()}, index=first.index)
    a = spike_lead_lag(frame, n_permutations=49)
    b = spike_lead_lag(frame.set_axis(frame.index + shift), n_permutations=49)
    pd.testing.assert_frame_equal(a.per_layer, b.per_layer)
    np.testing.assert_array_equal(a.matches["first_step"] + shift, b.matches["first_step"])


@FAST
@given(st.floats(1e-6, 1e6), st.floats(0, 2), st.floats(0, 0.01), st.integers(1, 1000), st.booleans(),
       st.sampled_from(["mad:6", "sigma:7,window=1000", "ratio:10", "mad:6+ratio:3|ratio:10"]))
def test_no_spikes_in_a_smooth_monotone_series(scale, power, rate, t0, decreasing, rule):
    t = np.arange(2000) + t0
    x = scale * t**power * np.exp(rate * t)
    assert find_spikes(pd.Series(x[::-1] if decreasing else x), rule).empty


@st.composite
def curves(draw):
    """A curve on irregular steps, as a hypothesis-drawn list of values."""
    values = draw(st.lists(st.floats(-1, 1), min_size=0, max_size=80))
    gaps = draw(st.lists(st.integers(1, 50), min_size=len(values), max_size=len(values)))
    return pd.Series(values, index=np.cumsum(gaps, dtype=np.int64), dtype=float)


@FAST
@given(curves(), st.floats(0, 0.1), st.integers(1, 7))
def test_no_dips_in_a_non_decreasing_curve(curve, min_depth, smooth):
    rising = curve.abs().cumsum()
    assert find_dips(rising, smooth=smooth).empty
    assert find_dips(rising, min_depth=min_depth, smooth=smooth).empty


@FAST
@given(curves(), st.integers(-10**6, 10**6))
def test_shifting_steps_shifts_every_dip_step(curve, shift):
    a, b = find_dips(curve), find_dips(curve.set_axis(curve.index + shift))
    for col in ("start_step", "bottom_step", "end_step"):
        np.testing.assert_array_equal(a[col] + shift, b[col])
    pd.testing.assert_frame_equal(a.drop(columns=["start_step", "bottom_step", "end_step"]),
                                  b.drop(columns=["start_step", "bottom_step", "end_step"]))
