import numpy as np
import pandas as pd
import pytest

from analysis import binomial_noise, find_dips, find_knn_dips, robust_noise

NOISE = 0.004


def rising_curve(seed=0, n=300, irregular=True):
    """A kNN-like curve rising to ~0.6 with Gaussian noise, on (ir)regular steps."""
    rng = np.random.default_rng(seed)
    gaps = rng.integers(5, 30, n) if irregular else np.full(n, 20)
    steps = np.cumsum(gaps)
    level = 0.6 * (1 - np.exp(-steps / steps[n // 4]))
    return pd.Series(level + rng.normal(0, NOISE, n), index=steps)


def plant(curve, at, width, depth):
    """Lower `width` points starting at position `at` by `depth`; return the planted steps."""
    y = curve.copy()
    y.iloc[at:at + width] -= depth
    return y, y.index[at:at + width]


def test_planted_dips_found_with_position_and_depth():
    y, first = plant(rising_curve(), 120, 4, 0.05)
    y, second = plant(y, 220, 2, 0.08)
    dips = find_dips(y)
    assert len(dips) == 2
    for dip, planted, depth in zip(dips.itertuples(), [first, second], [0.05, 0.08]):
        assert dip.bottom_step in planted
        assert dip.start_step < planted[0] and dip.end_step > planted[-1]
        assert dip.depth == pytest.approx(depth, abs=4 * NOISE)
        assert dip.recovered
        assert dip.depth_noise == pytest.approx(depth / NOISE, rel=0.3)  # the curve's own noise
    assert dips["noise"].iloc[0] == pytest.approx(NOISE, rel=0.25)


def test_open_dip_at_the_end_is_not_recovered():
    curve = rising_curve()
    y, planted = plant(curve, len(curve) - 5, 5, 0.1)
    dip = find_dips(y).iloc[-1]
    assert not dip.recovered
    assert dip.end_step == y.index[-1]
    assert dip.bottom_step in planted


def test_nan_holes_do_not_change_the_dips():
    y, _ = plant(rising_curve(seed=1), 150, 3, 0.06)
    holes = y.copy()
    holes.iloc[[10, 11, 12, 80, 200, 201]] = np.nan
    pd.testing.assert_frame_equal(find_dips(y, noise=NOISE), find_dips(holes, noise=NOISE))
    steps = ["start_step", "bottom_step", "end_step"]
    pd.testing.assert_frame_equal(find_dips(y)[steps], find_dips(holes)[steps])


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_short_curves_give_no_dips(n):
    assert find_dips(pd.Series([0.5, 0.1, 0.5][:n], index=range(n), dtype=float)).empty


def test_no_dips_in_a_non_decreasing_curve_even_with_zero_threshold():
    y = pd.Series(np.repeat(np.arange(50.0), 3), index=np.arange(150) * 7)
    assert find_dips(y).empty
    assert find_dips(y, min_depth=0.0).empty


def test_noise_free_rectangular_dip_depth_and_area():
    y = pd.Series(1.0, index=np.arange(40))
    y.iloc[10:20] = 0.9
    dip = find_dips(y, min_depth=0.05).iloc[0]
    assert (dip.start_step, dip.bottom_step, dip.end_step) == (9, 10, 20)
    assert dip.depth == pytest.approx(0.1)
    assert dip.area == pytest.approx(0.05 + 9 * 0.1 + 0.05)


def test_relative_threshold():
    y = pd.Series(0.5, index=np.arange(30))
    y.iloc[10:13] = 0.45  # 10% of the peak
    assert len(find_dips(y, min_depth=0.05, relative=True)) == 1
    assert find_dips(y, min_depth=0.2, relative=True).empty
    with pytest.raises(ValueError):
        find_dips(y, relative=True)


def test_noise_estimates():
    rng = np.random.default_rng(0)
    trend = np.linspace(0, 5, 5000)
    assert robust_noise(trend + rng.normal(0, 0.1, 5000)) == pytest.approx(0.1, rel=0.05)
    y, _ = plant(rising_curve(), 100, 3, 0.2)
    dip = find_dips(y, n_queries=1000).iloc[0]
    v = y.to_numpy()
    assert dip.noise == pytest.approx(np.median(np.sqrt(v * (1 - v) / 1000)))
    assert binomial_noise(0.5, 10_000) == pytest.approx(0.005)


def knn_frame(queue, val, n_queries=10_000):
    rows = [pd.DataFrame({"step": c.index, "epoch": c.index / 1000, "source": src, "k": 20,
                          "top1": c.to_numpy(), "top5": c.to_numpy(), "bank_size": 4096,
                          "n_queries": n_queries})
            for src, c in (("queue", queue), ("val", val)) if c is not None]
    return pd.concat(rows, ignore_index=True)


def test_knn_dips_are_confirmed_by_the_other_source():
    base = rising_curve(irregular=False)  # steps 20, 40, ...
    queue, real = plant(base, 100, 3, 0.05)
    queue, artifact = plant(queue, 200, 3, 0.05)
    val = plant(base, 100, 3, 0.05)[0].iloc[::2]  # the real dip, evaluated half as often
    dips = find_knn_dips(knn_frame(queue, val))
    q = dips[dips["source"] == "queue"]
    assert len(q) == 2
    assert q["bottom_step"].iloc[0] in real and q["bottom_step"].iloc[1] in artifact
    assert q["confirmed"].tolist() == [True, False]
    assert q["other_drop"].iloc[0] == pytest.approx(0.05, abs=0.02)
    v = dips[dips["source"] == "val"]
    assert len(v) == 1 and bool(v["confirmed"].iloc[0])


def test_knn_dips_single_source_and_empty():
    queue, _ = plant(rising_curve(), 100, 3, 0.06)
    dips = find_knn_dips(knn_frame(queue, None))
    assert len(dips) == 1 and dips["confirmed"].isna().all()
    assert find_knn_dips(knn_frame(queue, None).iloc[:0]).empty
    assert find_knn_dips(pd.DataFrame()).empty
    assert find_knn_dips(knn_frame(queue, None).assign(top1=np.nan)).empty


def test_knn_dips_use_the_most_common_k():
    queue, _ = plant(rising_curve(), 100, 3, 0.06)
    frame = knn_frame(queue, None)
    other_k = frame.assign(k=200, top1=0.1)
    assert len(find_knn_dips(pd.concat([frame, frame.iloc[:5].assign(k=200)]))) == 1
    assert find_knn_dips(pd.concat([frame, other_k]), k=200).empty


# Boundaries of the documented rules (docs/analysis.md, "Dips"): each test fails if one of
# the defaults (k = 5 noise units, tolerance = min_depth / 3, smooth = 5, confirm_k = 2) moves.

def flat_knn(n=40, p=0.5, every=100):
    """A noise-free flat curve at p; with n_queries=10,000 its binomial noise is 0.005 at p=0.5."""
    return pd.Series(p, index=np.arange(1, n + 1) * every)


@pytest.mark.parametrize("depth_sigma, found", [(4.0, False), (4.9, False), (5.1, True), (6.0, True)])
def test_binomial_five_sigma_rule(depth_sigma, found):
    y, planted = plant(flat_knn(), 20, 3, depth_sigma * 0.005)
    dips = find_dips(y, n_queries=10_000)
    assert len(dips) == found
    if found:
        dip = dips.iloc[0]
        assert dip.noise == pytest.approx(0.005)  # sqrt(0.5 * 0.5 / 10,000), by hand
        assert dip.depth_noise == pytest.approx(depth_sigma)
        assert dip.bottom_step == planted[0] and dip.end_step == y.index[23]


def test_one_point_back_within_min_depth_does_not_end_a_dip():
    """tolerance = min_depth / 3: a point 0.03 under the peak is still inside a 0.06-deep dip."""
    y = pd.Series(1.0, index=np.arange(40))
    y.iloc[10:15] = 0.9
    y.iloc[15] = 0.97
    y.iloc[16:21] = 0.9
    dips = find_dips(y, min_depth=0.06)
    assert len(dips) == 1
    assert (dips.start_step[0], dips.end_step[0]) == (9, 21)
    assert len(find_dips(y, min_depth=0.06, tolerance=0.06)) == 2  # what a tolerance of min_depth does


def test_one_lucky_evaluation_does_not_set_the_peak():
    """smooth = 5: a single high point is above its rolling median, so the running best
    stays at the level and the points after it are no dip."""
    y = pd.Series(0.5, index=np.arange(60))
    y.iloc[20] = 0.56
    assert find_dips(y, min_depth=0.03).empty
    assert len(find_dips(y, min_depth=0.03, smooth=1)) == 1  # the raw running maximum would


def test_false_dip_rate_on_pure_noise_matches_the_documented_table():
    """docs/analysis.md: 200-point flat N(0,1) curves, smooth 5, k 5 -> a dip in 2% of them
    (the raw maximum, smooth 1: 67%)."""
    curves = [pd.Series(np.random.default_rng(rep).standard_normal(200)) for rep in range(200)]
    assert np.mean([len(find_dips(y, noise=1.0)) > 0 for y in curves]) <= 0.05  # the defaults
    assert np.mean([len(find_dips(y, noise=1.0, smooth=1)) > 0 for y in curves]) >= 0.5


@pytest.mark.parametrize("drop_sigma, confirmed", [(1.5, False), (1.9, False), (2.1, True), (3.0, True)])
def test_confirmation_needs_two_sigma_of_the_other_source(drop_sigma, confirmed):
    queue, _ = plant(flat_knn(n=80, p=0.4, every=50), 40, 3, 0.05)  # steps 2050-2150, 10 sigma
    val = flat_knn()  # every 100 steps; noise 0.005
    val.loc[2100] -= drop_sigma * 0.005
    dips = find_knn_dips(knn_frame(queue, val))
    q = dips[dips["source"] == "queue"].iloc[0]
    assert (q.start_step, q.end_step) == (2000, 2200)
    assert q.other_drop == pytest.approx(drop_sigma * 0.005)
    assert bool(q.confirmed) == confirmed
