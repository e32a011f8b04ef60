import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from analysis import compare_runs, figure6_table, format_summary, seed_spread, summarize_run

LAYERS = ["patch_embed", "blocks.0", "blocks.1", "norm", "predictor"]
N_STEPS = 3000
SPIKE_STEPS = [500, 1100, 1700, 2300]


@dataclass
class FakeRun:
    """Stand-in for stabilitylab.run.Run: the attributes analysis uses, nothing else."""

    name: str
    config: dict
    steps: pd.DataFrame
    layers: pd.DataFrame
    knn: pd.DataFrame
    events: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["step", "kind", "detail", "time"]))
    meta: dict = field(default_factory=lambda: {"status": "finished"})
    path: str = ""

    def grad_norms(self, stat="grad_l2"):
        return self.layers.pivot(index="step", columns="layer", values=stat)


def make_run(name, patch_proj="learned", lr=1.5e-3, seed=0, queue_dip=False, val_dip=False,
             spikes=True, knn=True, layers=LAYERS):
    rng = np.random.default_rng(seed)
    step = np.arange(N_STEPS)
    steps = pd.DataFrame({"step": step, "epoch": step / 100, "lr": lr, "loss": 5 * np.exp(-step / 1000) + 1 + lr,
                          "grad_norm": 1.0, "skipped": False})
    x = np.exp(rng.normal(0, 0.1, (N_STEPS, len(layers))))
    if spikes and layers:
        x[SPIKE_STEPS, 0] *= 30
        x[np.add(SPIKE_STEPS, 3), -1] *= 30
        blocks = [i for i, layer in enumerate(layers) if layer.startswith("blocks.")]
        if blocks:  # the last block, where the lead-lag verdict looks
            x[np.add(SPIKE_STEPS, 3), blocks[-1]] *= 30
    grads = pd.DataFrame(x, index=step, columns=pd.CategoricalIndex(layers, categories=layers))
    long = grads.stack().rename("grad_l2").reset_index()
    long.columns = ["step", "layer", "grad_l2"]
    frames = []
    for source, every, dip in (("queue", 20, queue_dip), ("val", 100, val_dip)):
        s = np.arange(every, N_STEPS + 1, every)
        top1 = 0.1 + 0.5 * (1 - np.exp(-s / 800)) - 10 * lr + rng.normal(0, 0.002, len(s))
        if dip:
            top1[(s >= 2000) & (s < 2100)] -= 0.06
        frames.append(pd.DataFrame({"step": s, "epoch": s / 100, "source": source, "k": 20, "top1": top1,
                                    "top5": top1, "bank_size": 4096, "n_queries": 50_000}))
    config = {"model": {"patch_proj": patch_proj, "depth": 2}, "optim": {"base_lr": lr, "batch_size": 128,
              "name": "adamw", "betas": [0.9, 0.999]}, "seed": seed}
    return FakeRun(name, config, steps, long if layers else long.iloc[:0],
                   pd.concat(frames, ignore_index=True) if knn else frames[0].iloc[:0])


def test_summarize_run():
    summary = summarize_run(make_run("a", queue_dip=True))
    json.dumps(summary, allow_nan=False)
    assert summary["name"] == "a" and summary["status"] == "finished" and summary["n_steps"] == N_STEPS
    assert summary["knn_source"] == "val" and summary["n_dips"] == 0
    assert summary["final_top1"] == pytest.approx(0.1 + 0.5 * (1 - np.exp(-3000 / 800)) - 0.015, abs=0.01)
    assert summary["best_top1"] >= summary["final_top1"]
    queue_dips = [d for d in summary["dips"] if d["source"] == "queue"]
    assert len(queue_dips) == 1 and queue_dips[0]["confirmed"] is False
    assert 2000 <= queue_dips[0]["bottom_step"] < 2100
    assert summary["n_unconfirmed_dips"] == 1 and summary["n_confirmed_dips"] == 0
    assert summary["spikes"]["patch_embed"] == 4 and summary["spikes"]["predictor"] == 4
    assert summary["lead_lag"]["verdict"] == "first leads" and summary["lead_lag"]["median_lag"] == 3
    assert summary["lead_lag"]["p_value"] < 0.01
    assert summary["first_leads_frac"] == 1.0
    assert summary["notes"] == []
    text = format_summary(summary)
    assert "Run a (finished" in text and "NOT confirmed" in text and "patch_embed spikes lead" in text


def test_summarize_run_without_knn_or_layers():
    summary = summarize_run(make_run("bare", knn=False, layers=[]))
    json.dumps(summary, allow_nan=False)
    assert summary["final_top1"] is None and summary["lead_lag"] is None and summary["dips"] == []
    assert summary["notes"] == ["no kNN evaluations", "no per-layer gradient norms"]
    text = format_summary(summary)
    assert "Note: no kNN evaluations" in text


def test_summarize_run_without_patch_embed():
    summary = summarize_run(make_run("frozen", layers=LAYERS[1:]))
    assert summary["lead_lag"] is None and "patch_embed not logged: no lead-lag" in summary["notes"]
    assert summary["spikes"]["blocks.0"] == 4  # blocks.0 is the first column here


def test_compare_runs_and_figure6_table():
    runs = [make_run(f"{proj}-{lr}", patch_proj=proj, lr=lr, val_dip=(proj == "learned" and lr == 1e-2),
                     queue_dip=(proj == "learned" and lr == 1e-2))
            for proj in ("learned", "frozen") for lr in (1e-3, 1e-2)]
    table = compare_runs(runs)
    assert list(table.columns[:3]) == ["run", "model.patch_proj", "optim.base_lr"]
    assert "optim.batch_size" not in table and "optim.betas" not in table
    assert table["knn_source"].eq("val").all()
    dipped = table.set_index("run").loc["learned-0.01"]
    assert dipped.n_dips == 1 and dipped.deepest_dip == pytest.approx(0.06, abs=0.015)
    assert dipped.dip_area > 0
    assert table.set_index("run").drop("learned-0.01")["n_dips"].eq(0).all()
    assert table["n_first_layer_spikes"].eq(4).all() and table["first_leads_frac"].eq(1.0).all()
    assert table["roughness"].gt(0).all() and table["final_loss"].gt(1).all()

    grid = figure6_table(table)
    assert grid.shape == (2, 2)
    assert grid.loc["frozen", 1e-3] == pytest.approx(table.set_index("run").loc["frozen-0.001", "final_top1"])
    seeds = compare_runs(runs + [make_run("seed1", lr=1e-3, seed=1)], by=["model.patch_proj", "seed"])
    assert list(seeds.columns[1:4]) == ["model.patch_proj", "seed", "optim.base_lr"]
    assert figure6_table(seeds).loc["learned", 1e-3] == pytest.approx(
        seeds.set_index("run").loc[["learned-0.001", "seed1"], "final_top1"].mean())


def test_compare_runs_with_a_bare_run():
    table = compare_runs([make_run("a"), make_run("bare", knn=False, layers=[])])
    bare = table.set_index("run").loc["bare"]
    assert pd.isna(bare.final_top1) and pd.isna(bare.n_first_layer_spikes)


def test_peak_ratios_in_the_summary():
    # make_run multiplies patch_embed (first) and the last block by 30 at the spike steps,
    # on a log-normal background with sigma 0.1
    s = summarize_run(make_run("a"))
    assert 25 < s["first_peak_ratio"] < 40 and 25 < s["last_peak_ratio"] < 40
    quiet = summarize_run(make_run("quiet", spikes=False))
    assert 1.1 < quiet["first_peak_ratio"] < 2.0 and 1.1 < quiet["last_peak_ratio"] < 2.0
    assert "first layer 1." in format_summary(quiet)


def test_seed_spread_against_numpy():
    runs = [make_run(f"{proj}-{lr}-{seed}", patch_proj=proj, lr=lr, seed=seed)
            for proj in ("learned", "frozen") for lr in (1e-3, 1e-2) for seed in range(3)]
    table = compare_runs(runs)
    spread = seed_spread(table)
    assert len(spread) == 4 and spread["n_seeds"].eq(3).all()
    row = spread[(spread["model.patch_proj"] == "frozen") & (spread["optim.base_lr"] == str(1e-2))].iloc[0]
    top1 = table[table["run"].str.startswith("frozen-0.01-")]["final_top1"].to_numpy()
    assert row["final_top1_mean"] == pytest.approx(top1.mean())
    assert row["final_top1_std"] == pytest.approx(top1.std(ddof=1))
    assert "seed" not in spread and "roughness_std" in spread
    table["extra"] = np.arange(len(table))  # a metric of the caller's own
    extra = seed_spread(table, metrics=["extra"])
    assert len(extra) == 4 and list(extra["extra_mean"]) == [1.0, 4.0, 7.0, 10.0]
