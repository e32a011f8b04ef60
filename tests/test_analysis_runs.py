import json
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from pathlib import Path

from analysis import compare_runs, display_table, figure6_table, format_summary, seed_spread, summarize_run

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples" / "runs"

LAYERS = ["patch_embed", "blocks.0", "blocks.1", "norm", "predictor"]
N_STEPS = 3000
SPIKE_STEPS = [500, 900, 1300, 1700, 2100, 2500]  # 6 leads: an exact sign test can reach p < 0.05


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
    assert summary["spikes"]["patch_embed"] == 6 and summary["spikes"]["predictor"] == 6
    assert summary["lead_lag"]["verdict"] == "first leads" and summary["lead_lag"]["median_lag"] == 3
    lead_lag = summary["lead_lag"]
    assert lead_lag["first"] == "patch_embed" and lead_lag["last"] == "blocks.1"  # the last block
    assert lead_lag["association_p"] < 0.01 and lead_lag["n_matched"] == 6
    assert summary["first_leads_frac"] == 1.0
    assert summary["notes"] == [] and summary["warnings"] == []
    assert summary["spike_rule"] == "mad:6+ratio:3|ratio:10"
    text = format_summary(summary)
    assert "Run a (finished" in text and "NOT confirmed" in text
    assert "patch_embed vs blocks.1: patch_embed spikes lead blocks.1 spikes (6 matched spikes, median lag 3 " \
           "steps, association p = " in text
    assert "Spike rule: mad:6+ratio:3|ratio:10" in text


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
    assert summary["spikes"]["blocks.0"] == 6  # blocks.0 is the first column here


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
    assert table["n_first_layer_spikes"].eq(6).all() and table["first_leads_frac"].eq(1.0).all()
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
    assert quiet["spikes"] == dict.fromkeys(LAYERS, 0)
    assert all(not e["spike"] for e in quiet["largest_excursions"])
    text = format_summary(quiet)
    assert "Verdict: no spike events, largest excursion " in text and "(below the rule)" in text


def upper_median_ratio(x: np.ndarray, i: int, window: int = 100) -> float:
    """x[i] over the upper median of the `window` values before it, by sorting."""
    before = np.sort(x[max(0, i - window):i])
    return x[i] / before[len(before) // 2]


def test_largest_excursions_name_layer_step_and_ratio():
    run = make_run("a")
    s = summarize_run(run)
    excursions = s["largest_excursions"]
    assert len(excursions) == 5
    ratios = [e["ratio"] for e in excursions]
    assert ratios == sorted(ratios, reverse=True)
    wide = run.grad_norms()
    for e in excursions:  # each planted 30x spike, against an independent running median
        x = wide[e["layer"]].to_numpy()
        assert e["ratio"] == pytest.approx(upper_median_ratio(x, wide.index.get_loc(e["step"])), rel=1e-12)
        assert e["spike"] and e["step"] in SPIKE_STEPS + [s + 3 for s in SPIKE_STEPS]
        assert e["ratio"] > 20
    first = wide["patch_embed"].to_numpy()
    assert s["first_peak_ratio"] == pytest.approx(max(upper_median_ratio(first, i) for i in SPIKE_STEPS))
    biggest = excursions[0]
    text = format_summary(s)
    assert f"{biggest['layer']} at step {biggest['step']}: {biggest['ratio']:.3g}x its running median (spike)" in text
    assert f"largest excursion {biggest['layer']} {biggest['ratio']:.3g}x at step {biggest['step']}" in text


def test_every_spike_number_follows_the_rule():
    """The ratios do not depend on the rule's tests; the counts and spike flags do."""
    run = make_run("a")
    default, strict = summarize_run(run), summarize_run(run, rule="ratio:100")
    assert strict["spike_rule"] == "ratio:100" and "Spike rule: ratio:100" in format_summary(strict)
    assert strict["spikes"] == dict.fromkeys(LAYERS, 0)
    assert strict["first_peak_ratio"] == default["first_peak_ratio"]
    # without events, the excursions are the layers' own peaks: one per layer, the same largest
    assert strict["largest_excursions"][0] == {**default["largest_excursions"][0], "spike": False}
    assert len({e["layer"] for e in strict["largest_excursions"]}) == len(strict["largest_excursions"])
    assert not any(e["spike"] for e in strict["largest_excursions"])
    assert strict["lead_lag"]["verdict"] == "no matched spikes"
    assert "patch_embed had no spikes, so nothing to lead" in format_summary(strict)
    wide = summarize_run(run, rule="ratio:10,window=500")
    assert wide["spike_window"] == 500 and "median of its previous 500 values" in format_summary(wide)


def test_committed_run_text_agrees_with_itself():
    """The issue's example: 'first layer 26.6x its running median' next to 'patch_embed 0'
    spikes. Under the default rule every >= 10x excursion is a spike, so a layer whose peak
    is >= 10x has at least one event, and each such excursion is marked as a spike."""
    import stabilitylab as sl

    run = sl.load_run(SAMPLES / "findings" / "variants_lr1e-1" / "patch_proj=learned_seed0")
    s = summarize_run(run)
    text = format_summary(s)
    assert s["first_peak_ratio"] == pytest.approx(26.6, abs=0.05) and s["spikes"]["patch_embed"] == 1
    assert "patch_embed at step 71: 26.6x its running median (spike)" in text
    assert "Spike events: patch_embed 1, cls_token 3, blocks.2 1" in text
    for e in s["largest_excursions"]:
        if e["ratio"] >= 10:
            assert e["spike"] and s["spikes"][e["layer"]] >= 1
    tens = summarize_run(run, rule="ratio:10")
    assert sum(tens["spikes"].values()) == sum(1 for e in tens["largest_excursions"] if e["spike"])


def test_warning_when_the_run_is_shorter_than_the_warmup():
    run = make_run("short")
    for n, warned in [(50, True), (51, False)]:
        short = FakeRun("short", run.config, run.steps.head(n), run.layers[run.layers["step"] < n],
                        run.knn[run.knn["step"] < n])
        s = summarize_run(short)
        assert bool(s["warnings"]) is warned, (n, s["warnings"])
    s = summarize_run(FakeRun("short", run.config, run.steps.head(40), run.layers[run.layers["step"] < 40],
                              run.knn.iloc[:0]))
    assert s["warnings"] == ["only 40 gradient-norm values per layer, not more than the spike rule's warm-up of "
                             "50: no spike can be detected and no ratio measured yet"]
    assert s["first_peak_ratio"] is None and s["largest_excursions"] == []
    assert "Warning: only 40 gradient-norm values per layer" in format_summary(s)
    assert summarize_run(short, rule="ratio:10,warmup=20")["warnings"] == []


def test_first_and_last_layer_come_from_the_run_meta():
    run = make_run("a")
    assert summarize_run(run)["lead_lag"]["last"] == "blocks.1"
    run.meta = {"status": "finished", "first_layer": "blocks.0", "last_block": "predictor"}
    s = summarize_run(run)
    assert (s["lead_lag"]["first"], s["lead_lag"]["last"]) == ("blocks.0", "predictor")
    assert s["n_first_layer_spikes"] == 0  # blocks.0 has no planted spikes
    assert summarize_run(run, first="patch_embed")["lead_lag"]["first"] == "patch_embed"


def test_dips_are_named_with_steps_and_noise_units():
    run = make_run("a", val_dip=True, queue_dip=True)
    s = summarize_run(run)
    val = [d for d in s["dips"] if d["source"] == "val"]
    assert len(val) == 1 and val[0]["bottom_step"] == 2000 and val[0]["confirmed"] is True
    curve = run.knn[run.knn["source"] == "val"].set_index("step")["top1"]
    noise = np.median(np.sqrt(curve * (1 - curve) / 50_000))  # binomial, 50,000 queries
    assert val[0]["depth_noise"] == pytest.approx(val[0]["depth"] / noise)
    assert 20 < val[0]["depth_noise"] < 35  # a 6-point dip at about 2.2 points of noise
    text = format_summary(s)
    assert (f"val dip, steps {val[0]['start_step']}-2000-{val[0]['end_step']} (start-bottom-end): "
            f"-{100 * val[0]['depth']:.1f} points = {val[0]['depth_noise']:.1f} noise units, recovered, "
            "confirmed by the other kNN") in text
    assert "1 kNN dip(s) (val), deepest" in text.splitlines()[1]


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


def linear_rows(*rows):
    """A `linear` table: (step, protocol, top1, top5, n_val), probed one after the other."""
    frame = pd.DataFrame(rows, columns=["step", "protocol", "top1", "top5", "n_val"])
    return frame.assign(time=pd.date_range("2026-01-01", periods=len(frame), freq="h", tz="UTC"))


def test_the_linear_probe_reaches_the_summary_its_text_compare_and_figure6():
    probed = make_run("probed")
    probed.linear = linear_rows((1000, "fast", 0.20, 0.6, 1000), (2999, "fast", 0.25, 0.7, 1000),
                                (2999, "official", 0.3125, 0.75, 10_000))
    summary = summarize_run(probed)
    json.dumps(summary, allow_nan=False)
    assert {k: summary[k] for k in summary if k.startswith("linear_")} == dict(
        linear_top1=0.3125, linear_top5=0.75, linear_protocol="official", linear_step=2999, linear_n_val=10_000)
    assert "Linear probe (official, step 2999): top-1 31.2% / top-5 75.0% (10,000 images)" in format_summary(summary)
    bare = summarize_run(make_run("never probed"))
    assert bare["linear_top1"] is None and bare["linear_step"] is None
    assert "Linear probe" not in format_summary(bare)

    # a 2 x 2 grid, one cell (frozen, 1e-2) never probed, one (learned, 1e-3) probed for two seeds
    runs = []
    for proj, lr, seed, top1 in [("learned", 1e-3, 0, 0.30), ("learned", 1e-3, 1, 0.40), ("learned", 1e-2, 0, 0.20),
                                 ("frozen", 1e-3, 0, 0.35), ("frozen", 1e-2, 0, None)]:
        run = make_run(f"{proj}-{lr}-{seed}", patch_proj=proj, lr=lr, seed=seed)
        if top1 is not None:
            run.linear = linear_rows((2999, "fast", top1, 0.8, 1000))
        runs.append(run)
    table = compare_runs(runs)
    assert "linear_top1" in table and table.columns.get_loc("linear_top1") > table.columns.get_loc("best_top1")
    assert table.set_index("run")["linear_top1"].tolist()[:4] == [0.30, 0.40, 0.20, 0.35]
    assert pd.isna(table.set_index("run").at["frozen-0.01-0", "linear_top1"])
    shown = display_table(table).set_index("run")["linear_top1"]
    assert shown["learned-0.001-1"] == 40.0 and pd.isna(shown["frozen-0.01-0"])
    never_probed = table.assign(linear_top1=float("nan"))
    assert "linear_top1" not in display_table(never_probed) and "final_top1" in display_table(never_probed)
    grid = figure6_table(table, value="linear_top1")
    assert grid.shape == (2, 2) and pd.isna(grid.at["frozen", 1e-2])
    assert grid.at["learned", 1e-3] == pytest.approx(0.35) and grid.at["learned", 1e-2] == pytest.approx(0.20)
    spread = seed_spread(table)
    assert spread.set_index(["model.patch_proj", "optim.base_lr"]).at[("learned", str(1e-3)), "linear_top1_mean"] \
        == pytest.approx(0.35)
