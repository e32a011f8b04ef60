"""The committed sample runs load and go through the whole analysis (they are what a new user
tries first)."""
import importlib.util
import json
import re
from pathlib import Path

import pytest

import stabilitylab as sl
from analysis import compare_runs, figure6_table, spike_lead_lag, summarize_run

SAMPLES = Path(__file__).resolve().parents[1] / "data_samples" / "runs"


def test_sample_runs_load_and_summarize():
    runs = sl.load_runs(SAMPLES)
    assert len(runs) == 4 and all(r.meta["status"] == "finished" for r in runs)
    for run in runs:
        assert run.steps["step"].tolist() == list(range(312))
        assert set(run.knn["source"]) == {"queue", "val"}
        summary = summarize_run(run)
        json.dumps(summary, allow_nan=False)
        assert 0.2 < summary["final_top1"] < 0.35  # above the 10% of chance
    learned = next(r for r in runs if r.name == "learned_lr1e-1")
    assert spike_lead_lag(learned.grad_norms()).last == "blocks.3"


def test_sample_runs_form_the_figure6_grid():
    table = figure6_table(compare_runs(sl.load_runs(SAMPLES)))
    assert table.shape == (2, 2)
    assert list(table.index) == ["frozen", "learned"]


def experiment_script(name):
    """A script of experiments/ imported as a module."""
    path = SAMPLES.parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_findings_runs_rebuild_the_findings_tables(capsys):
    """docs/findings.md says its tables come from `experiments/findings_tables.py` on the
    committed runs: check that they load and give the page's headline numbers."""
    assert experiment_script("findings_tables").main([str(SAMPLES / "findings")]) == 0
    out = capsys.readouterr().out
    runs = sl.load_runs(sorted((SAMPLES / "findings").iterdir()))
    assert len(runs) == 44 + 33  # rounds 1 and 2
    assert all(r.meta["status"] == "finished" for r in runs)
    # S5: the batch sizes side by side, each with its length in steps
    s5 = out[out.index("### S5"):].split("\n\n")[1].splitlines()
    assert [row.split("|")[1:6] for row in s5[2:]] == [
        [" 0.01 ", " 128 ", " 8.0 ", " 3 ", " 312 "], [" 0.01 ", " 512 ", " 8.0 ", " 3 ", " 72 "],
        [" 0.01 ", " 512 ", " 35.0 ", " 3 ", " 315 "], [" 0.01 ", " 1024 ", " 8.0 ", " 3 ", " 32 "],
        [" 0.1 ", " 128 ", " 8.0 ", " 3 ", " 312 "], [" 0.1 ", " 512 ", " 35.0 ", " 3 ", " 315 "]]
    # ≥10x spikes of the patch projection, learned, base lr 1e-1: 5, the largest 27x
    learned = next(line for line in out.splitlines()
                   if line.startswith("| variants_lr1e-1: patch_proj=learned, base_lr=0.1 (3) |"))
    assert learned.split("|")[2].strip() == "5 (27×)"
    # clipping at 1 acts only at the step-71 spike: identical to learned seed 0 until then
    clip = sl.load_run(SAMPLES / "findings" / "clip_lr1e-1" / "patch_proj_clip=1_seed0").steps["loss"]
    plain = sl.load_run(SAMPLES / "findings" / "variants_lr1e-1" / "patch_proj=learned_seed0").steps["loss"]
    assert (clip[:72] == plain[:72]).all() and (clip[72:80] != plain[72:80]).any()


def test_findings2_tables_show_the_attention_collapse_of_the_hot_lr(capsys, tmp_path):
    """docs/findings.md, round 2: the collapse table and the R1 rows from the committed runs."""
    tables = experiment_script("findings2_tables")
    assert tables.main([str(SAMPLES / "findings")]) == 0
    out = capsys.readouterr().out
    collapse = out[out.index("### collapse_tiny"):].split("\n\n")[1].splitlines()[2:]
    rows = [[c.strip() for c in row.split("|")[1:-1]] for row in collapse]
    hot, cool = [r for r in rows if r[0] == "0.1"], [r for r in rows if r[0] == "0.01"]
    assert len(hot) == 3 and len(cool) == 3
    assert all(float(r[2]) < 0.1 and int(r[3]) > 500 and r[4] == "30" for r in hot)
    assert all(float(r[2]) > 0.7 and int(r[3]) < 50 and r[4] == "never" for r in cool)
    assert [r[5] for r in hot] == ["cls_token 96 (417×)", "none", "none"]
    assert "| r1_lr/base_lr=4e-3_seed0 | 3000 (finished) | 48.8 | 48.8 |" in out
    assert "| r1_lr/base_lr=3.2e-2_seed0 | 3000 (finished) | 39.1 | 39.4 | 2.3 | 1 | 0 | cls_token 9.4× |" in out
    precursors = out[out.index("r1_lr/base_lr=3.2e-2_seed0, 1 spike events:"):]
    assert "| adam_freshness | 1 | 0 / 1 / 0 | +0 (+0 … +0) | 0.6 |" in precursors
    assert "| r1_lr_hot/base_lr=1.28e-1_seed0 | 3000 (finished) | 14.5 | 31.5 |" in out
    hot_row = next(line for line in out.splitlines() if line.startswith("| r1_lr_hot/base_lr=1.28e-1_seed0 |"))
    assert hot_row.endswith("| cls_token 1152 | 1268 (7 of 12) |")  # the patch projection's first >= 10x: 7th
    # the controls from step 0, every run cut at their 1,600 steps: the frozen projection breaks
    # sooner (kNN 18.0% at step 999), beta2 0.95 spikes less and does not fall
    controls = out[out.index("### R1: the controls from step 0"):out.index("### R1: which signal")]
    assert "| r1_lr_hot/base_lr=1.28e-1_seed0 | 1600 (first 1600) | 25.3 | 31.5 | 15.9 | 72 | 71 |" in controls
    assert "| r1_unstable_frozen/patch_proj=frozen_seed0 | 31.3 | 18.0 | 16.5 | 20.0 |" in controls
    frozen = next(line for line in controls.splitlines() if line.startswith("| r1_unstable_frozen/") and "finished" in line)
    assert frozen.endswith("| cls_token 793 | frozen |")
    assert "| r1_unstable_beta2/base_lr=1.28e-1_seed0 | 1600 (finished) | 27.9 | 31.5 | 8.2 | 53 | 51 | cls_token 68.5× |" in controls
    assert "| r1_unstable_beta2/base_lr=1.28e-1_seed1 | 1600 (finished) | 26.4 | 30.8 | 7.1 | 76 | 75 | cls_token 112.4× |" in controls
    # where the storm starts: the first >= 10x gradient spike comes before any block's max
    # attention logit reaches 1,000 in 4 of the 8 runs at that lr (all fp32); frozen seed 1, beta2 seed 1
    # and both bf16 seeds have it the other way
    onsets = out[out.index("### R1: where the storm starts"):out.index("### R1: which signal")]
    assert "| r1_lr_hot/base_lr=1.28e-1_seed0 | cls_token 1152 | blocks.4 1154 | 583 (blocks.4) | 1160 (blocks.4) | +8 |" in onsets
    assert "| r1_unstable_beta2/base_lr=1.28e-1_seed0 | cls_token 329 | blocks.0 629 | 272 (blocks.0) | 380 (blocks.0) | +51 |" in onsets
    lags = {line.split("|")[1].strip(): int(line.rsplit("|", 2)[1])
            for line in onsets.splitlines() if line.startswith(("| r1_lr_hot/", "| r1_unstable_"))}
    assert lags.pop("r1_unstable_frozen/patch_proj=frozen_seed1") == -89
    assert lags.pop("r1_unstable_beta2/base_lr=1.28e-1_seed1") == -22
    # in bf16 the logit burst comes first in both seeds, and without warm-up at the first read (step 10)
    assert [lags.pop(f"r1_unstable_bf16/precision=bf16_seed{s}") for s in (0, 1)] == [-68, -679]
    assert [lags.pop(f"r1_unstable_nowarmup/warmup_steps=0_seed{s}") for s in (0, 1)] == [-240, -28]
    assert len(lags) >= 4 and all(lag > 0 for lag in lags.values()), lags
    # bf16 reproduces the fp32 storm: kNN ~29-31% at step 1,399, ~20-22% by 1,599
    assert "| r1_unstable_bf16/precision=bf16_seed0 | 29.8 | 29.8 | 29.3 | 21.7 |" in controls
    assert "| r1_unstable_bf16/precision=bf16_seed1 | 29.2 | 29.2 | 28.1 | 20.6 |" in controls
    assert "| r1_unstable_frozen/patch_proj=frozen_seed1 | 30.1 | 30.3 | 30.3 | 20.7 |" in controls  # breaks late
    # the storm's window replayed: unchanged = the original bit for bit; the lower lr removes it
    replays = out[out.index("r1_lr_hot/base_lr=1.28e-1_seed0, steps 1100–1299 (replayed from step 1000):"):]
    replays = replays[:replays.index("\n\n", replays.index("| original"))]
    original = "| 30 | cls_token 53.7× | 27.2× | 10.5× | 30.3 | 30.3 | 22.1 |"
    assert f"| original {original}" in replays and f"| unchanged replay {original}" in replays
    assert "| optim.base_lr=6.4e-2 | 0 | cls_token 5.4× | 3.4× | 3.3× | 30.9 | 31.9 | 31.4 |" in replays
    assert "| optim.weight_decay=0.099 | 1 | cls_token 35.6× |" in replays  # the placebo
    # R2: at batch 1024 and 4x the peak lr both optimizers break, AdamW twice, LAMB sooner and
    # to chance; the batch-256 run at the same base lr learns on at equal images seen
    r2 = out[out.index("### R2"):].split("\n\n")[1]
    assert "| r1_lr_hot/base_lr=6.4e-2_seed0 | adamw | 256 | 0.064 | 3000 | 32.3 | 33.5 |" in r2
    assert ("| r2_batch1024/optim=adamw_seed0 | adamw | 1024 | 0.256 | 1000 | 31.7 | 32.1 | 27.5 | 27.9 | 27.3 | 28.4 "
            "| 16.8 | 16.3 |") in r2
    assert "| r2_batch1024/optim=lamb_seed0 | lamb | 1024 | 0.256 | 1000 | 28.4 | 19.1 | 12.3 | 15.3 | 10.6 |" in r2
    assert "| r2_batch1024/optim=adamw_seed0 | 1000 (finished) | 16.3 | 32.1 | 30.3 | 113 | 113 | cls_token 976.2× |" in out
    assert "| r2_batch1024/optim=lamb_seed0 | 1000 (finished) | 9.9 | 29.2 | 49.1 | 623 | 623 | norm 3923.6× |" in out
    # R2's second seeds: both break as seed 0 did, and the blocks' step size and weight norm
    # say how: LAMB's step is a quarter of the blocks' norm, AdamW's a twentieth
    assert ("| r2_batch1024/optim=adamw_seed1 | adamw | 1024 | 0.256 | 1000 | 30.5 | 30.3 | 30.2 | 20.5 | 19.5 | 16.2 "
            "| 16.0 | 13.4 |") in r2
    assert "| r2_batch1024/optim=lamb_seed1 | lamb | 1024 | 0.256 | 1000 | 29.1 | 14.4 | 13.6 | 15.7 | 13.5 |" in r2
    assert "| r2_batch1024/optim=lamb_seed1 | 1000 (finished) | 11.9 | 29.1 | 44.1 | 688 | 688 |" in out
    weights = out[out.index("### R2: the blocks' weights"):].split("\n\n")[1]
    assert "| r2_batch1024/optim=adamw_seed1 | adamw | 1024 | 0.046 (0.026–0.085) | 1.8 | 0.974 (917) | 2.24 | 0 |" in weights
    assert "| r2_batch1024/optim=lamb_seed0 | lamb | 1024 | 0.261 (0.225–0.300) | 0.79 | 3.82e-08 (999) | 3.82e-08 | 162 |" in weights
    assert "| r2_batch1024/optim=lamb_seed1 | lamb | 1024 | 0.254 (0.223–0.306) |" in weights
    # LAMB with the gains out of weight decay: the blocks' norm does not collapse, learning does
    assert "| r2_lamb_nodecay/exclude_norm_bias_wd=true_seed1 | lamb | 1024 | 0.256 | 500 | 28.8 | 19.6 | 12.6 |" in r2
    assert "| r2_lamb_nodecay/exclude_norm_bias_wd=true_seed1 | lamb | 1024 | 0.213 (0.185–0.247) | 4.47 | 1.39 (354) |" in weights
    # R2-Q: AdamW at batch 1024 with qk_norm keeps its logits bounded and learning far longer
    assert "| r2_qknorm/qk_norm=true_seed0 | adamw | 1024 | 0.256 | 1000 | 32.1 | 32.8 | 32.5 | 31.2 | 31.1 | 31.8 | 30.0 | 27.9 |" in r2
    assert "| r2_qknorm/qk_norm=true_seed1 | adamw | 1024 | 0.256 | 1000 | 30.5 | 32.5 | 31.0 | 32.1 | 32.0 | 32.7 | 30.8 | 24.1 |" in r2
    assert ("| r2_qknorm/qk_norm=true_seed0 | 1000 (finished) | 27.9 | 32.8 | 9.1 | 19 | 18 | blocks.6 118.0× "
            "| 0.00 (blocks.0, step 830) | 54 (blocks.0, step 840) | blocks.6 809 | none |") in out
    assert ("| r2_qknorm/qk_norm=true_seed1 | 1000 (finished) | 24.1 | 32.7 | 14.1 | 27 | 26 | blocks.7 115.8× "
            "| 0.50 (blocks.1, step 930) | 32 (blocks.2, step 870) | cls_token 262 | none |") in out
    # R2-S: with qk_norm and the square-root rule (peak 0.128) batch 1024 learns past batch 256, no break
    assert "| r2_qknorm_sqrt/base_lr=3.2e-2_seed0 | adamw | 1024 | 0.128 | 1000 | 34.2 | 34.9 | 35.1 | 36.3 | 37.0 | 36.3 | 36.7 | 36.7 |" in r2
    assert "| r2_qknorm_sqrt/base_lr=3.2e-2_seed1 | adamw | 1024 | 0.128 | 1000 | 33.3 | 34.8 | 34.2 | 35.4 | 35.7 | 36.6 | 37.2 | 36.5 |" in r2
    assert "| r2_qknorm_sqrt/base_lr=3.2e-2_seed1 | 1000 (finished) | 36.5 | 37.2 | 1.0 | 0 | 0 | blocks.5 6.1× |" in out
    # its control without qk_norm (400 steps): a block's logit passes 1,000 at step 380
    assert "| r2_sqrt/base_lr=3.2e-2_seed0 | 400 (finished) | 35.6 | 35.6 | 0.0 | 1 | 1 | blocks.4 18.0× |" in out
    # a run still warming up (a sweep's next run, read while it trains) has no "after warm-up" yet
    warming = tables.FirstSteps(sl.load_run(SAMPLES / "findings" / "r2_batch1024" / "optim=adamw_seed1"), 200)
    assert tables.r2_weights_table([warming]).splitlines()[-1].endswith("| nan | — | 1.2 | 0 |")
    with pytest.raises(SystemExit) as exit_info:
        tables.main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no collapse_tiny, r1_* or r2_* sweep" in capsys.readouterr().err


def test_findings2_tables_skip_a_run_that_has_not_logged_a_step(tmp_path, capsys):
    """A sweep's next run, just started, has a run directory but no step yet: the tables of
    the others still print (they once failed on it), and stderr says which run was left out."""
    findings = SAMPLES / "findings"
    (tmp_path / "r1_lr_hot").symlink_to(findings / "r1_lr_hot")
    sweep = tmp_path / "r1_unstable_bf16"
    sweep.mkdir()
    (sweep / "precision=bf16_seed0").symlink_to(findings / "r1_unstable_bf16" / "precision=bf16_seed0")
    started = sweep / "precision=bf16_seed1"
    (started / "steps").mkdir(parents=True)
    meta = json.loads((findings / "r1_unstable_bf16" / "precision=bf16_seed1" / "meta.json").read_text())
    (started / "meta.json").write_text(json.dumps({**meta, "status": "running"}))
    (started / "config.yaml").write_text((findings / "r1_unstable_bf16" / "precision=bf16_seed1" / "config.yaml").read_text())
    assert experiment_script("findings2_tables").main([str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.err == f"skipping {started}: no step logged yet\n"
    assert "| r1_unstable_bf16/precision=bf16_seed0 | 1600 (finished) | 21.7 |" in captured.out
    assert "precision=bf16_seed1" not in captured.out


def test_findings_figures_are_written_from_the_committed_runs(tmp_path):
    from matplotlib.image import imread

    assert experiment_script("findings_figures").main([str(SAMPLES / "findings"), str(tmp_path)]) == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["r1_knn_lr.png", "r1_unstable_controls.png", "r2_batch1024.png", "s1_s2_knn_seeds.png",
                     "s5_knn_seeds_same_epochs.png", "s5_knn_seeds_same_steps.png", "s6_knn_seeds.png"]
    for name in names:
        height, width = imread(tmp_path / name).shape[:2]  # 6.4 in wide at 200 dpi; 3.6 in of axes
        assert width == 1280 and 720 < height < 1000  # plus the legend below them


def test_findings_scripts_reject_a_folder_without_sweeps(tmp_path, capsys):
    for script in ("findings_tables", "findings_figures"):
        with pytest.raises(SystemExit) as exit_info:
            experiment_script(script).main([str(tmp_path / "missing")])
        assert exit_info.value.code == 2 and "missing is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        experiment_script("findings_tables").main([str(tmp_path)])
    assert exit_info.value.code == 2 and "no finished run in any of variants_lr1e-1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        experiment_script("findings_figures").main([str(tmp_path), str(tmp_path / "figures")])
    assert exit_info.value.code == 2 and "no figure written" in capsys.readouterr().err


def report_table(page: str, after: str) -> list[list[str]]:
    """The body rows of the first table after the text `after` of a built report, as cell texts."""
    from test_report import page_text

    html = page[page.index(after):]
    body = html[html.index("<tbody>"):html.index("</tbody>")]
    return [[page_text(cell).strip() for cell in re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


SURFACE_RUN = SAMPLES / "findings" / "batch512_long_lr1e-1" / "batch_size=512_seed0"


@pytest.mark.parametrize("rule", [None, "ratio:10,warmup=13", "mad:6+ratio:3|ratio:10,warmup=13"])
def test_every_surface_gives_one_run_the_same_answer(rule, capsys):
    """One committed run, one rule: `analyze --json`, `compare --csv`, the report's text and
    the findings tables (for the rules they use: >= 10x at this batch-512 run's 13-step
    warm-up, and the summary rule at that warm-up) give the same spike counts per layer, the
    same largest excursion (layer, step, ratio) and the same lead-lag numbers; the counts
    against `find_spikes` itself."""
    import io

    import pandas as pd

    from analysis import DEFAULT_RULE, SpikeRule, find_spikes
    from stabilitylab.cli import main
    from stabilitylab.report import build_report
    from test_report import page_text

    flag = [] if rule is None else ["--spike-rule", rule]
    assert main(["analyze", str(SURFACE_RUN), "--json", *flag]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["spike_rule"] == str(SpikeRule.parse(rule or DEFAULT_RULE))
    run = sl.load_run(SURFACE_RUN)
    events = find_spikes(run.grad_norms(), rule)
    per_layer = {layer: n for layer, n in summary["spikes"].items() if n}
    assert per_layer == events["layer"].astype(str).value_counts().to_dict()
    top = summary["largest_excursions"][0]
    ll = summary["lead_lag"]
    if rule == "ratio:10,warmup=13":  # the findings page's first-layer table: steps 40, 161 and 208
        assert sum(per_layer.values()) == 31 and per_layer["patch_embed"] == 3
        assert (top["layer"], top["step"], round(top["ratio"], 1)) == ("blocks.2", 170, 121.4)

    # compare: totals, the first layer's count, peak ratios and lead fraction, in display units
    assert main(["compare", str(SURFACE_RUN), "--csv", *flag]) == 0
    row = pd.read_csv(io.StringIO(capsys.readouterr().out)).iloc[0]
    assert row.n_spikes == sum(per_layer.values()) and row.n_first_layer_spikes == per_layer.get("patch_embed", 0)
    assert row.first_peak_ratio == round(summary["first_peak_ratio"], 1)
    assert row.last_peak_ratio == round(summary["last_peak_ratio"], 1)
    assert row.first_leads_frac == round(summary["first_leads_frac"], 2)

    # the report: the verdict's counts and largest excursion, the lead-lag paragraph and table
    page = build_report([run], rule=rule)
    text = page_text(page)
    assert "Spike events " + ", ".join(f"{layer} {n}" for layer, n in per_layer.items()) in text
    assert f"{top['layer']} at step {top['step']}: {top['ratio']:.3g}x its running median (spike)" in text
    assert ll["summary"] in text
    rows = {r[0]: r for r in report_table(page, "Lead-lag of gradient spikes")}
    per_layer_ll = spike_lead_lag(run.grad_norms(), rule=rule).per_layer  # every later layer, not only the last
    assert {layer: int(rows[layer][3]) for layer in rows} == dict(zip(per_layer_ll["layer"].astype(str),
                                                                      per_layer_ll["n_matched"]))
    last = rows[ll["last"]]
    assert [int(last[1]), int(last[2]), int(last[3])] == [ll["n_first_events"], ll["n_last_events"], ll["n_matched"]]
    assert float(last[9]) == ll["xcorr_lag"] and float(last[10]) == pytest.approx(ll["association_p"], abs=5e-4)

    # the findings tables, which count >= 10x spikes and summarize with DEFAULT_RULE, both at the run's warm-up
    tables = experiment_script("findings_tables")
    if rule == "ratio:10,warmup=13":
        assert tables.run_rule(run, "ratio:10") == SpikeRule.parse(rule)
        counts = tables.ten_x_counts({"seed0": [run]}).splitlines()
        header, values = counts[0].split(" | ")[1:], counts[2].split(" | ")[1:]
        cells = {layer.strip(" |"): v.strip(" |") for layer, v in zip(header, values) if v.strip(" |") != "0"}
        assert {layer: int(v.split()[0]) for layer, v in cells.items()} == per_layer
        assert cells[top["layer"]].endswith(f"({top['ratio']:.0f}×)")
        first = tables.first_layer_spikes([run]).splitlines()[2:]
        assert len(first) == per_layer["patch_embed"]
        patch = max((e for e in summary["largest_excursions"] if e["layer"] == "patch_embed"), key=lambda e: e["ratio"])
        assert f"| {patch['step']} | {patch['ratio']:.1f} |" in "\n".join(first)
        # the lead-lag table at analyze's max_lag: the same counts, lags and p-values
        tables.MAX_LAG = int(ll["max_lag"])
        lead = next(line for line in tables.lead_lag_table({"seed0": [run]}).splitlines() if "| ratio ≥10× |" in line)
        cells = [c.strip() for c in lead.split("|")[1:-1]]
        assert [int(c) for c in cells[3:6]] == [ll["n_first_events"], ll["n_last_events"], ll["n_matched"]]
        assert float(cells[8]) == ll["xcorr_lag"] and float(cells[9]) == pytest.approx(ll["association_p"], abs=5e-4)
    elif rule is not None:  # the summary rule at the run's warm-up: the sweep tables' spike columns
        table = tables.run_table([run], by=["optim.batch_size"]).iloc[0]
        assert str(SpikeRule.parse(f"{tables.SUMMARY_RULE},warmup={tables.spike_warmup(run)}")) == summary["spike_rule"]
        assert table.n_spikes == sum(per_layer.values()) and table.n_first_layer_spikes == per_layer["patch_embed"]
        assert table.first_peak_ratio == summary["first_peak_ratio"]
        assert table.first_leads_frac == summary["first_leads_frac"]


def test_eps_regime_reads_adam_state_per_group_from_checkpoints(tmp_path, capsys):
    """experiments/eps_regime.py: median sqrt(v-hat) per group, against the optimizer state read
    by parameter name, and the attention key bias, which has no gradient (softmax ignores a
    shift shared by all keys), far below every trained block's median."""
    import torch
    from stabilitylab.cli import main
    from test_train import TINY
    from trainer.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *TINY, "optim.max_steps=4", "knn.enabled=false"]) == 0
    capsys.readouterr()
    eps_regime = experiment_script("eps_regime")
    checkpoint = list_checkpoints(run_dir)[-1]
    medians = eps_regime.median_sqrt_v(run_dir, checkpoint)
    assert list(medians)[:3] == ["patch_embed", "cls_token", "blocks.0"]
    state = torch.load(checkpoint.path, weights_only=True)
    names = [n for n, p in eps_regime.build_method(eps_regime.config_from_run(run_dir)).named_parameters()
             if p.requires_grad]
    by_name = dict(zip(names, state["optimizer"]["state"].values()))
    t = float(by_name["backbone.patch_embed.proj.weight"]["step"])
    beta2 = state["config"]["optim"]["betas"][1]
    patch = torch.cat([(by_name[n]["exp_avg_sq"] / (1 - beta2 ** t)).sqrt().flatten()
                       for n in names if n.startswith("backbone.patch_embed.")])
    assert medians["patch_embed"] == pytest.approx(float(patch.median()), rel=1e-6)
    qkv_bias = (by_name["backbone.blocks.0.attn.qkv.bias"]["exp_avg_sq"] / (1 - beta2 ** t)).sqrt()
    key_bias = qkv_bias[qkv_bias.numel() // 3: 2 * qkv_bias.numel() // 3]
    assert float(key_bias.max()) < 1e-3 * medians["blocks.0"]
    assert eps_regime.main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert f"| {checkpoint.step} | " in out and "patch_embed" in out
    with pytest.raises(SystemExit) as exit_info:
        eps_regime.main([str(run_dir), "--steps", "999"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("qk_norm", [False, True])
def test_block_gains_reads_each_branch_gain_from_checkpoints(tmp_path, capsys, qk_norm):
    """experiments/block_gains.py: the RMS of every block's norm1 / norm2 gain (and with
    qk_norm its q_norm / k_norm gain) per checkpoint, against the checkpoint's tensors read
    directly; a folder without checkpoints is an error."""
    import torch
    from stabilitylab.cli import main
    from test_train import TINY
    from trainer.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    assert main(["train", "--out", str(run_dir), *TINY, "optim.max_steps=4", "knn.enabled=false",
                 f"model.qk_norm={str(qk_norm).lower()}"]) == 0
    capsys.readouterr()
    block_gains = experiment_script("block_gains")
    assert block_gains.main([str(run_dir)]) == 0
    rows = [line.split(" | ") for line in capsys.readouterr().out.splitlines()[2:]]
    checkpoint = list_checkpoints(run_dir)[-1]
    model = torch.load(checkpoint.path, weights_only=True)["model"]
    depth = len({k.split(".")[2] for k in model if k.startswith("backbone.blocks.")})
    gains = {"norm1": "attention", "norm2": "MLP"}
    if qk_norm:
        gains |= {"attn.q_norm": "query (qk_norm)", "attn.k_norm": "key (qk_norm)"}
    last = rows[-len(gains):]
    assert [(row[1], row[2]) for row in last] == [(str(checkpoint.step), branch) for branch in gains.values()]
    for row, norm in zip(last, gains):
        expected = [model[f"backbone.blocks.{i}.{norm}.weight"].pow(2).mean().sqrt().item() for i in range(depth)]
        assert [float(v) for v in row[3:3 + depth]] == pytest.approx(expected, rel=0.06)  # printed to 2 digits
        assert all(0.5 < v < 1.5 for v in expected)  # four small steps leave the gains near 1
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        block_gains.main([str(tmp_path / "empty")])
    assert exit_info.value.code == 2 and "has no checkpoint" in capsys.readouterr().err


UNSTABLE = SAMPLES / "findings" / "r1_lr_hot"


def test_the_committed_real_instability_tells_one_story_on_every_surface(capsys):
    """configs/cpu_unstable.yaml's committed runs (two seeds of 3,000 steps at peak lr 1.28e-1):
    the preset is their config cut at 1,600 steps; analyze --json, the report and the raw
    parquet rows agree that the fresh-bank kNN fell >= 20 noise units without recovering,
    that >= 10x spikes storm through every block after step 1,000, and that the patch
    projection neither spikes first nor leads."""
    from dataclasses import asdict

    from analysis import find_spikes
    from stabilitylab.cli import main
    from stabilitylab.config import load_config
    from stabilitylab.report import build_report
    from test_report import page_text

    for seed in (0, 1):
        preset = asdict(load_config("cpu_unstable", [f"seed={seed}"]))
        run_dir = UNSTABLE / f"base_lr=1.28e-1_seed{seed}"
        run = sl.load_run(run_dir)
        made = asdict(load_config(str(run_dir / "config.yaml"), ["optim.max_steps=1600"]))
        differ = {k for k in preset if preset[k] != made[k]}
        assert differ <= {"log"}, differ  # only how it was logged; checkpoints too, which the replays need
        assert {k: v for k, v in preset["log"].items() if k != "progress"} == {
            k: v for k, v in made["log"].items() if k != "progress"}

        assert main(["analyze", str(run_dir), "--json"]) == 0
        summary = json.loads(capsys.readouterr().out)
        [fall] = [d for d in summary["dips"] if d["source"] == "val"]
        assert fall["depth_noise"] > 20 and not fall["recovered"]
        val = run.knn[run.knn["source"] == "val"].set_index("step")["top1"]
        assert val.loc[:1000].min() > 0.27 and val.iloc[-1] < 0.17  # the raw rows: a stall near 30%, then the fall
        assert summary["final_top1"] == pytest.approx(val.iloc[-1])

        onsets = find_spikes(run.grad_norms(), "ratio:10").groupby("layer", observed=True)["step"].min()
        blocks = onsets[[f"blocks.{i}" for i in range(8)]]
        assert blocks.between(1000, 1600).all()  # the storm reaches every block within the preset's 1,600 steps
        assert onsets["patch_embed"] > onsets.drop("patch_embed").sort_values().iloc[2]  # not among the first three
        assert summary["lead_lag"]["direction_p"] > 0.05 and "no evidence that patch_embed spikes lead" in (
            summary["lead_lag"]["summary"])

        text = page_text(build_report([run]))
        assert summary["lead_lag"]["summary"] in text
        assert "Spike events " + ", ".join(f"{layer} {n}" for layer, n in summary["spikes"].items() if n) in text
        assert f"-{100 * fall['depth']:.1f} points = {fall['depth_noise']:.1f} noise units, not recovered" in text
