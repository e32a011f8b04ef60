"""`stabilitylab replay`: the unchanged replay is the original bit for bit (CPU), a frozen
patch projection freezes the current weights, refusals are one line with nothing written,
and the report's replay section (plots_probes) compares them on the original's baseline."""
import numpy as np
import pandas as pd
import pytest
import torch

import stabilitylab as sl
from stabilitylab.cli import main
from stabilitylab.plots_probes import common_knn, replay_comparisons, replay_sections
from stabilitylab.replay import choose_checkpoint, find_replays
from trainer.checkpoint import latest_checkpoint, load_checkpoint

from test_train import SAME, TINY

PARENT = [*TINY, "optim.max_steps=12", "checkpoint.every_steps=4", "checkpoint.keep=3", "log.attention_every=3"]


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "run"
    assert main(["train", "--out", str(path), *PARENT]) == 0
    return path


@pytest.fixture(scope="module")
def replayed(parent):
    assert main(["replay", str(parent), "--at", "6", "--steps", "4", "--with", "model.patch_proj=frozen"]) == 0
    return parent


def test_unchanged_replay_is_bit_exact_and_frozen_freezes_the_current_weights(replayed):
    parent = replayed
    original = sl.load_run(parent)
    unchanged, frozen = sorted(find_replays(original), key=lambda r: r.meta["replay"]["mitigation"] or "")
    assert unchanged.meta["replay"] == {"parent": "../..", "at": 6, "steps": 4, "checkpoint": "checkpoints/step-00000003.pt",
                                        "from_step": 3, "mitigation": None}
    assert unchanged.meta["source"] == "stabilitylab replay" and unchanged.meta["status"] == "finished"
    window = lambda table: table[table["step"].between(4, 9)].reset_index(drop=True)
    assert unchanged.steps["step"].tolist() == list(range(4, 10))
    pd.testing.assert_frame_equal(window(unchanged.steps)[SAME], window(original.steps)[SAME])
    pd.testing.assert_frame_equal(window(unchanged.layers), window(original.layers))  # every norm and probe
    attention = lambda run: window(run.table("attention")).astype({"layer": str})
    assert len(attention(original)) == 4  # steps 6 and 9, two blocks
    pd.testing.assert_frame_equal(attention(unchanged), attention(original))
    queue = lambda run: window(run.knn[run.knn["source"] == "queue"]).drop(columns="epoch")
    pd.testing.assert_frame_equal(queue(unchanged), queue(original))

    assert frozen.meta["replay"]["mitigation"] == "model.patch_proj=frozen"
    assert frozen.config["model"]["patch_proj"] == "frozen"
    assert "patch_embed" not in set(frozen.layers["layer"]) and "patch_embed" in set(unchanged.layers["layer"])
    start = load_checkpoint(choose_checkpoint(parent, 6))["model"]
    end = load_checkpoint(latest_checkpoint(frozen.path))["model"]  # after step 9
    for name in ("backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias"):
        assert torch.equal(end[name], start[name])  # the weights at the checkpoint, kept
    assert not torch.equal(end["backbone.blocks.0.attn.qkv.weight"], start["backbone.blocks.0.attn.qkv.weight"])
    assert (frozen.steps["loss"].to_numpy() != unchanged.steps["loss"].to_numpy()).any()

    # a second call keeps the finished replays instead of redoing them
    assert main(["replay", str(parent), "--at", "6", "--steps", "4"]) == 0
    assert sl.load_run(unchanged.path).meta["start_time"] == unchanged.meta["start_time"]


@pytest.mark.parametrize("args, message", [
    (["--at", "6", "--with", "model.depth=3"], "model.depth cannot change mid-run"),
    (["--at", "6", "--with", "model.patch_proj=batchnorm"], "cannot change from learned to batchnorm"),
    (["--at", "6", "--with", "optim.name=lamb"], "optim.name cannot change mid-run"),
    (["--at", "6", "--with", "seed=0"], "the run's own value"),
    (["--at", "6", "--with", "optim.nonsense=1"], "optim.nonsense"),
    (["--at", "3"], "no checkpoint before step 3"),
    (["--at", "40"], "outside the run's steps 1..11"),
    (["--at", "6", "--steps", "0"], "at least one step"),
])
def test_refusals_are_one_line_and_write_nothing(parent, tmp_path, capsys, args, message):
    before = sorted(p.name for p in (parent / "replays").iterdir()) if (parent / "replays").exists() else []
    assert main(["replay", str(parent), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stabilitylab replay: error:") and message in err and "\n" not in err
    after = sorted(p.name for p in (parent / "replays").iterdir()) if (parent / "replays").exists() else []
    assert after == before
    assert main(["replay", str(tmp_path / "nope"), "--at", "6"]) == 2


def test_the_newest_usable_checkpoint_wins_regular_or_pre_spike(tmp_path):
    for path in ["checkpoints/step-00000003.pt", "checkpoints/step-00000009.pt", "spikes/checkpoints/step-00000006.pt"]:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).touch()
    assert choose_checkpoint(tmp_path, 7).path.name == "step-00000006.pt"
    assert choose_checkpoint(tmp_path, 7).path.parent.parent.name == "spikes"
    assert choose_checkpoint(tmp_path, 10).step == 9
    assert choose_checkpoint(tmp_path, 6).step == 3  # step 6's own state is after step 6


def test_replay_section_compares_each_replay_on_the_original_baseline(replayed):
    original = sl.load_run(replayed)
    [comparison] = replay_comparisons(original, rule="ratio:10,window=4,warmup=2")
    assert (comparison.at, comparison.window, comparison.start) == (6, (6, 9), 4)
    ratios = comparison.ratios
    assert list(ratios.index) == ["original", "unchanged replay", "model.patch_proj=frozen"]  # unchanged first: does the window reproduce?
    pd.testing.assert_series_equal(ratios.loc["unchanged replay"], ratios.loc["original"], check_names=False)
    assert np.isnan(ratios.at["model.patch_proj=frozen", "patch_embed"])
    # the original's ratio by hand: each value over the upper median of the 4 before it
    x = original.grad_norms()["blocks.1"]
    by_hand = max(x[s] / np.sort(x[x.index < s].tail(4))[len(x[x.index < s].tail(4)) // 2] for s in range(6, 10))
    assert ratios.at["original", "blocks.1"] == pytest.approx(by_hand, rel=1e-12)
    # the frozen replay's later layers keep the original's history as baseline
    frozen = [r for r in find_replays(original) if r.meta["replay"]["mitigation"]][0].grad_norms()["blocks.1"]
    combined = pd.concat([x[x.index < 4], frozen])
    by_hand = max(combined[s] / np.sort(combined[combined.index < s].tail(4))[2] for s in range(6, 10))
    assert ratios.at["model.patch_proj=frozen", "blocks.1"] == pytest.approx(by_hand, rel=1e-12)
    assert set(comparison.knn["replay"]) == set(ratios.index) and comparison.knn["step"].between(4, 9).all()

    [section] = replay_sections(original)
    [fig], [table] = section.figures, section.tables
    bars = [t for t in fig.data if t.type == "bar"]
    assert [t.name for t in bars] == list(ratios.index) and len(bars[0].x) == len(original.grad_norms().columns)
    [knn_column] = [c for c in table.columns if c.startswith("kNN top-1")]
    assert {"replay", "patch_embed", "spikes"} <= set(table.columns)
    source, step, top1 = common_knn(comparison)  # one step that every replay and the original evaluated
    assert knn_column == f"kNN top-1 ({source}) at step {step} (%)" and step <= comparison.window[1]
    for name, rows in comparison.knn[comparison.knn["source"] == source].groupby("replay"):
        assert table.set_index("replay").at[name, knn_column] == round(100 * rows.set_index("step").at[step, "top1"], 1)
    fig.to_json()  # serialisable for the HTML report


def test_one_change_replayed_twice_keeps_both_rows(replayed, tmp_path):
    """A second unchanged replay of the window (a determinism check) is a row of its own, named
    by its folder, not a silent overwrite of the first."""
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(replayed, copy, ignore=shutil.ignore_patterns("checkpoints"))
    [unchanged] = [p for p in (copy / "replays").iterdir() if p.name.endswith("_unchanged")]
    shutil.copytree(unchanged, unchanged.with_name(unchanged.name + "_again"))
    [comparison] = replay_comparisons(sl.load_run(copy), rule="ratio:10,window=4,warmup=2")
    assert list(comparison.ratios.index) == ["original", f"unchanged replay ({unchanged.name})",
                                             f"unchanged replay ({unchanged.name}_again)", "model.patch_proj=frozen"]
    assert set(comparison.knn["replay"]) == set(comparison.ratios.index)
