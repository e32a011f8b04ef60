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


def test_importing_stabilitylab_loads_nothing_heavy_until_a_name_is_used():
    """`import stabilitylab` loads neither pandas nor torch (its docstring's promise); the
    first use of `load_run` brings pandas but not torch, `Monitor` brings torch."""
    code = ("import sys, stabilitylab as sl; "
            "heavy = lambda: sorted({m.split('.')[0] for m in sys.modules} & {'pandas', 'pyarrow', 'torch'}); "
            "assert heavy() == [], heavy(); sl.load_run; assert heavy() == ['pandas', 'pyarrow'], heavy(); "
            "sl.Monitor; assert 'torch' in heavy(); "
            "assert sl.__all__ == ['Monitor', 'Run', 'RunDirError', 'concat_runs', 'load_run', 'load_runs', "
            "'__version__'] and all(getattr(sl, name) for name in sl.__all__) and set(sl.__all__) <= set(dir(sl))")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
