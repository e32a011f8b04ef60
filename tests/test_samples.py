"""The committed sample runs load and go through the whole analysis (they are what a new user
tries first)."""
import json
from pathlib import Path

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
