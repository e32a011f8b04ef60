"""Which signal moved first: planted onsets of known lead, and the signals of a real probed run."""
import numpy as np
import pandas as pd
import pytest

from analysis import find_spikes
from analysis.precursors import precursor_table, run_signals, signal_onsets, signal_rule


def _noise(rng, n, columns, index=None):
    index = np.arange(n) if index is None else index
    return pd.DataFrame(np.exp(0.05 * rng.standard_normal((len(index), len(columns)))),
                        index=index, columns=columns)


def test_planted_onsets_give_their_leads():
    rng = np.random.default_rng(0)
    steps, layers = 2000, ["patch_embed", "blocks.0", "blocks.7"]
    grad = _noise(rng, steps, layers)
    update = _noise(rng, steps, layers)
    freshness = _noise(rng, steps, layers)
    logit = _noise(rng, steps // 10, ["blocks.0", "blocks.7"], index=np.arange(0, steps, 10))
    for spike in (1200, 1700):
        grad.loc[spike, "blocks.7"] *= 30
        grad.loc[spike - 2, "patch_embed"] *= 20  # the first layer leads by 2
        update.loc[spike - 5, "blocks.0"] *= 15   # the update norm by 5
        freshness.loc[spike - 9, "blocks.7"] /= 20  # freshness falls 9 steps before
        logit.loc[spike + 10, "blocks.7"] *= 12   # attention moves after the spike
    events = find_spikes(grad[["blocks.7"]])
    assert events["step"].tolist() == [1200, 1700]
    signals = {"grad_l2": grad, "update_l2": update, "adam_freshness": freshness, "max_logit": logit}
    onsets = signal_onsets(events, signals, lookback=20)
    got = onsets.set_index(["step", "signal"])
    for spike in (1200, 1700):
        assert got.loc[(spike, "grad_l2"), "signal_layer"] == "patch_embed"
        assert got.loc[(spike, "grad_l2"), "lead"] == 2
        assert got.loc[(spike, "update_l2"), "lead"] == 5
        assert got.loc[(spike, "adam_freshness"), ["direction", "lead"]].tolist() == ["fall", 9]
        assert got.loc[(spike, "max_logit"), "lead"] == -10
    table = precursor_table(events, signals, lookback=20).set_index("signal")
    assert table.loc["adam_freshness", ["n_moved", "n_before", "median_lead"]].tolist() == [2, 2, 9.0]
    assert table.loc["max_logit", ["n_before", "n_after"]].tolist() == [0, 2]
    # freshness moved twice; each move is within 20 steps of 41 of the 2,000 steps
    assert table.loc["adam_freshness", "chance_moved"] == pytest.approx(2 * 82 / 2000)


def test_a_sparse_signal_uses_the_rows_that_cover_the_rule_s_steps():
    rng = np.random.default_rng(3)
    grad = _noise(rng, 400, ["blocks.7"])
    logit = _noise(rng, 40, ["blocks.7"], index=np.arange(0, 400, 10))
    grad.loc[300, "blocks.7"] *= 30
    logit.loc[290, "blocks.7"] *= 30  # row 29: inside a warm-up of 50 rows, not of 5
    rule = signal_rule(None, logit)
    assert (rule.window, rule.warmup) == (10, 5)
    onsets = signal_onsets(find_spikes(grad), {"grad_l2": grad, "max_logit": logit})
    assert onsets.set_index("signal").loc["max_logit", "lead"] == 10


def test_a_signal_that_moves_all_the_time_is_near_every_spike_by_chance():
    rng = np.random.default_rng(2)
    grad = _noise(rng, 3000, ["blocks.7"])
    noisy = _noise(rng, 3000, ["blocks.7"])
    grad.loc[[1000, 2000], "blocks.7"] *= 30
    noisy.loc[np.arange(100, 3000, 15), "blocks.7"] *= 30  # a move every 15 steps
    table = precursor_table(find_spikes(grad), {"grad_l2": grad, "update_l2": noisy}, lookback=20)
    row = table.set_index("signal").loc["update_l2"]
    assert row["n_moved"] == 2 and row["chance_moved"] > 1.8


def test_a_signal_that_does_not_move_is_absent_and_lookback_bounds_the_search():
    rng = np.random.default_rng(1)
    grad = _noise(rng, 600, ["blocks.7"])
    update = _noise(rng, 600, ["blocks.7"])
    grad.loc[300, "blocks.7"] *= 30
    update.loc[260, "blocks.7"] *= 30  # 40 steps early: outside a lookback of 20
    events = find_spikes(grad)
    onsets = signal_onsets(events, {"grad_l2": grad, "update_l2": update}, lookback=20)
    assert onsets["signal"].tolist() == ["grad_l2"]
    wide = signal_onsets(events, {"grad_l2": grad, "update_l2": update}, lookback=40)
    assert wide.set_index("signal").loc["update_l2", "lead"] == 40


def test_run_signals_of_a_probed_run_are_its_layers_and_blocks(tmp_path):
    from test_train import run_tiny  # a real run with every probe on
    _, run = run_tiny(tmp_path, "optim.max_steps=6", "knn.enabled=false", "log.attention_every=2",
                      "log.attention_samples=4")
    signals = run_signals(run)
    assert {"grad_l2", "update_l2", "adam_freshness", "update_rms_over_lr", "max_logit",
            "entropy_mean"} <= set(signals)
    assert "patch_embed" in signals["adam_freshness"].columns
    assert all(c.startswith("blocks.") for c in signals["max_logit"].columns)
    attention = run.table("attention")
    assert len(signals["entropy_mean"]) == attention["step"].nunique()
    last = signals["grad_l2"].columns[-1]
    expected = run.layers[run.layers["layer"] == last].set_index("step")["grad_l2"]
    np.testing.assert_allclose(signals["grad_l2"][last].to_numpy(), expected.to_numpy())
