"""keep_heap: on a CPU the trainer asks glibc to keep freed step memory, so that a step stops
page-faulting its activation buffers back in (docs/benchmarks.md). mallopt is process-wide and
cannot be undone, so the test trains in a process of its own: first with keep_heap=false, then
a second trainer with keep_heap=true."""
import os
import subprocess
import sys

import pytest

# the minor page faults per step of a few steps on one fixed batch, after a warm-up
FAULTS = """
import resource, sys, torch
from stabilitylab.config import load_config
from trainer import Trainer
g = torch.Generator().manual_seed(0)
x1, x2 = (torch.randn(64, 3, 32, 32, generator=g) for _ in range(2))
labels = torch.zeros(64, dtype=torch.long)
for keep in ("false", "true"):
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=256", "data.num_workers=0",
                             "optim.batch_size=64", "knn.enabled=false", "log.progress=false",
                             "threads=1", "precision=fp32", "keep_heap=" + keep])
    trainer = Trainer(cfg, sys.argv[1])
    for step in range(9):
        if step == 3:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        trainer.train_step(x1, x2, labels)
        trainer.step += 1
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 6)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_heap_stops_a_cpu_step_from_page_faulting(tmp_path):
    result = subprocess.run([sys.executable, "-c", FAULTS, str(tmp_path / "unused")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    default, kept = map(float, result.stdout.split())
    assert default > 1000, default  # glibc returns the activations and faults them back in
    assert kept < default / 5, (kept, default)  # 17-100x fewer in CI runs
