"""StreamingSpikeDetector, fed value by value, against the offline find_spikes on whole series:
every committed run under the default rule, other rules of the grammar, gaps, and resume."""
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import stabilitylab as sl
from analysis import DEFAULT_RULE, find_spikes, running_ratio
from analysis.spikes import SpikeRule, StreamingSpikeDetector

ROOT = Path(__file__).resolve().parents[1]
RUNS = sorted(p.parent for p in (ROOT / "data_samples" / "runs").rglob("meta.json"))


def stream(wide: pd.DataFrame, rule=None, detector=None):
    """Feed a wide frame row by row; (detector, onsets returned along the way)."""
    detector = detector or StreamingSpikeDetector(wide.columns, rule)
    onsets = []
    for step, row in zip(wide.index, wide.to_numpy()):
        onsets += detector.update(step, row)
    return detector, onsets


@pytest.fixture(scope="module")
def grad_norms():
    return {run: sl.load_run(run).grad_norms() for run in RUNS}


def test_every_committed_run_gives_the_offline_events_exactly(grad_norms):
    assert len(RUNS) >= 40
    total = 0
    for run, wide in grad_norms.items():
        detector, onsets = stream(wide)  # rule=None: whatever DEFAULT_RULE is
        assert detector.rule == DEFAULT_RULE
        offline = find_spikes(wide)
        pd.testing.assert_frame_equal(detector.events(), offline, check_exact=True, obj=str(run))
        # the onsets came online, at their step, with the ratio the report shows at that step
        assert sorted((e["layer"], e["step"]) for e in onsets) == sorted(
            zip(offline["layer"].astype(str), offline["step"]))
        ratio = running_ratio(wide)
        assert [e["ratio"] for e in onsets] == [ratio.at[e["step"], e["layer"]] for e in onsets]
        total += len(offline)
    assert total > 100  # the comparison covered many real events


@pytest.mark.parametrize("rule", ["ratio:3", "mad:4,window=30", "mad:3+ratio:1.5|ratio:4,window=20,warmup=5",
                                  "ratio:1.2,window=1,warmup=0", "sigma:3", "sigma:2+ratio:1.5,window=10,warmup=3"])
def test_other_rules_of_the_grammar(grad_norms, rule):
    runs = list(grad_norms.values())[::8]
    n_events = 0
    for wide in runs:
        detector, _ = stream(wide, rule)
        offline = find_spikes(wide, rule)
        # sigma's two-pass sums run over a ring buffer online and a strided window offline:
        # the same values in another order, so equal to the last bits
        pd.testing.assert_frame_equal(detector.events(), offline, check_exact="sigma" not in rule, rtol=1e-13)
        n_events += len(offline)
    assert n_events > 0


def test_sigma_scores_are_exact_where_running_sums_drift():
    """Both sigma tests against a two-pass numpy mean / std of the previous window: exact
    even after values 1e5x the window's have left it, where pandas' running sums (which
    the offline detector used once) drift (1.7e-5 relative with pandas 3.1)."""
    rng = np.random.default_rng(0)
    x = rng.lognormal(np.log(1e-2), 0.2, 300)
    x[:5] = 1e3
    x[100::50] *= 8  # spikes
    wide = pd.DataFrame({"a": x})
    rule = "sigma:3,window=10,warmup=3"
    online, offline = stream(wide, rule)[0].events(), find_spikes(wide, rule)
    reference = np.array([(x[s] - x[s - 10:s].mean()) / x[s - 10:s].std(ddof=1) for s in online["step"]])
    assert {100, 150, 200, 250} <= set(online["step"])
    np.testing.assert_allclose(online["score"], reference, rtol=1e-13)
    assert list(offline["step"]) == list(online["step"])
    np.testing.assert_allclose(offline["score"], reference, rtol=1e-13)
    rolling = pd.Series(x).rolling(10).agg(["mean", "std"]).shift(1).loc[online["step"]]
    assert not np.allclose((x[online["step"]] - rolling["mean"]) / rolling["std"], reference, rtol=1e-9)


def test_gaps_and_non_positive_values_are_skipped_as_offline():
    rng = np.random.default_rng(3)
    wide = pd.DataFrame(rng.lognormal(0, 0.3, (400, 3)), columns=["a", "b", "c"], index=np.arange(400) * 2)
    wide.iloc[100::37, 0] *= 30  # spikes
    wide.iloc[::11, 1] = np.nan  # a layer logged on fewer steps
    wide.iloc[5::13, 2] = 0.0
    wide.iloc[150:160, 0] = np.nan  # a gap inside a run of values
    rule = "mad:6+ratio:3|ratio:10,window=40,warmup=20"
    detector, _ = stream(wide, rule)
    offline = find_spikes(wide, rule)
    assert len(offline[offline["layer"] == "a"]) >= 5
    pd.testing.assert_frame_equal(detector.events(), offline, check_exact=True)


def test_no_events_gives_the_same_empty_frame():
    wide = pd.DataFrame({"a": np.ones(80), "b": np.full(80, 2.0)})
    detector, onsets = stream(wide)
    assert onsets == [] and detector.events().empty
    pd.testing.assert_frame_equal(detector.events(), find_spikes(wide), check_index_type=False)


def test_a_resumed_detector_continues_where_it_stopped(grad_norms):
    wide = max(grad_norms.values(), key=lambda w: len(find_spikes(w)))
    half = len(wide) // 2
    first, _ = stream(wide.iloc[:half])
    state = first.state_dict()
    resumed = StreamingSpikeDetector(wide.columns)
    resumed.load_state_dict(state)
    stream(wide.iloc[half:], detector=resumed)
    pd.testing.assert_frame_equal(resumed.events(), find_spikes(wide), check_exact=True)
    with pytest.raises(ValueError, match="spike detector state"):
        StreamingSpikeDetector(wide.columns, SpikeRule.parse("ratio:5")).load_state_dict(state)
    with pytest.raises(ValueError, match="one per layer"):
        resumed.update(0, [1.0])


# ---------------------------------------------------------------- the trainer's online detector

def online_trainer(tmp_path, *overrides, name="run"):
    from stabilitylab.rundir import RunWriter, write_meta
    from test_train import config
    from trainer import Trainer

    run_dir = tmp_path / name
    write_meta(run_dir, {"status": "running"})
    writer = RunWriter(run_dir)
    return Trainer(config(*overrides), run_dir, writer), writer


def test_trainer_flags_a_spike_online_like_offline_and_skips_that_update(tmp_path, capsys):
    rule = "mad:6+ratio:3|ratio:10,warmup=4"
    trainer, writer = online_trainer(tmp_path, "optim.max_steps=10", "knn.enabled=false", "on_spike=skip",
                                     f"log.spike_rule={rule}", "log.progress=true")
    forward = trainer.forward

    def hot(x1, x2, m):  # step 7's loss x100: every gradient 100x its usual size
        loss, feats = forward(x1, x2, m)
        return (loss * 100 if trainer.step == 7 else loss), feats

    trainer.forward = hot
    trainer.fit()
    writer.close()
    run = sl.load_run(tmp_path / "run")
    spikes = run.events[run.events["kind"] == "spike"]
    offline = find_spikes(run.grad_norms(), rule)
    assert set(spikes["step"]) == {7} and len(spikes) == len(run.grad_norms().columns)
    assert sorted(zip(spikes["layer"], spikes["step"])) == sorted(zip(offline["layer"].astype(str), offline["step"]))
    ratio = running_ratio(run.grad_norms())
    assert spikes["ratio"].tolist() == [ratio.at[7, layer] for layer in spikes["layer"]]
    assert (spikes["ratio"] > 30).all()
    assert run.steps["skipped"].tolist() == [s == 7 for s in range(10)]
    assert (run.layers.loc[run.layers["step"] == 7, "update_l2"] == 0).all()
    assert (run.layers.loc[run.layers["step"] == 8, "update_l2"] > 0).all()
    skipped = run.events[run.events["kind"] == "skipped_step"]
    assert skipped["step"].tolist() == [7] and "on_spike=skip" in skipped["detail"].iloc[0]
    assert run.meta["spike_skips"] == 1
    assert "spike at step 7: patch_embed" in capsys.readouterr().out


def test_too_many_skipped_updates_in_a_row_stop_the_run(tmp_path):
    from trainer import UserError

    trainer, _ = online_trainer(tmp_path, "optim.max_steps=10", "knn.enabled=false", "on_spike=skip",
                                "log.spike_rule=ratio:0,warmup=3", "max_spike_skips=3")
    with pytest.raises(UserError, match="3 spiking updates skipped in a row at step 5"):
        trainer.fit()
    assert trainer.step == 6 and trainer.spike_skips == 3


def test_on_spike_checkpoint_is_the_state_before_the_spiking_update(tmp_path):
    """The pre-spike checkpoint equals the regular one a save() after the previous step wrote."""
    import torch

    from trainer.checkpoint import list_checkpoints, load_checkpoint

    trainer, writer = online_trainer(tmp_path, "optim.max_steps=7", "on_spike=checkpoint",
                                     "log.spike_rule=ratio:0,warmup=5", "checkpoint.every_steps=5")
    trainer.fit()  # every value from the 6th on is flagged: one episode, starting at step 5
    writer.close()
    run_dir = tmp_path / "run"
    [spike] = list_checkpoints(run_dir / "spikes")
    regular = {c.step: c for c in list_checkpoints(run_dir)}[4]
    assert spike.step == 4 and spike.path.name == regular.path.name
    before, reference = load_checkpoint(spike), load_checkpoint(regular)
    assert before["step"] == reference["step"] == 5

    def same(a, b, where):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b), where
        elif isinstance(a, dict):
            assert a.keys() == b.keys(), where
            for key in a:
                same(a[key], b[key], f"{where}.{key}")
        elif isinstance(a, (list, tuple)):
            assert len(a) == len(b), where
            for i, (x, y) in enumerate(zip(a, b)):
                same(x, y, f"{where}[{i}]")
        elif isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b, err_msg=where)
        else:
            assert a == b or (a != a and b != b), where  # NaN (an empty slot of the detector) equals NaN

    same(before, reference, "checkpoint")
    events = sl.load_run(run_dir).events
    assert events.loc[events["kind"] == "spike_checkpoint", "step"].tolist() == [4]
