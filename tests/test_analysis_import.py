import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_importing_analysis_loads_no_torch_trainer_or_stabilitylab():
    code = ("import sys, analysis; "
            "from analysis import (find_dips, find_knn_dips, find_spikes, spike_lead_lag, LeadLagResult, "
            "compare_runs, figure6_table, summarize_run, format_summary, binomial_noise); "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'trainer', 'stabilitylab')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
