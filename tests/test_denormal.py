"""flush_denormal: on a CPU the trainer makes torch compute subnormal floats as 0 while it
trains, because x86 cores take far longer on them and collapsed attention makes many
(docs/benchmarks.md), and puts the thread's floating-point state back when fit() ends (numpy
shares it: hypothesis, for one, refuses to run without subnormals). The state is the
process's, so the test trains in a process of its own, once with the setting off and once on,
multiplying a subnormal float inside a training step and after fit()."""
import json
import os
import platform
import subprocess
import sys

import pytest

TRAIN = """
import json, sys, torch
from stabilitylab.config import load_config
from stabilitylab.rundir import RunWriter, read_meta
from trainer import Trainer

def product():
    return (torch.tensor([1e-39]) * torch.tensor([1.0])).item()  # 1e-39 is subnormal in fp32

for flush in ("false", "true"):
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0",
                             "optim.batch_size=32", "optim.max_steps=2", "knn.enabled=false",
                             "log.progress=false", "threads=1", "flush_denormal=" + flush])
    writer = RunWriter(sys.argv[1] + flush)
    trainer = Trainer(cfg, writer.run_dir, writer)
    during, step = [], trainer.train_step
    trainer.train_step = lambda *batch: during.append(product()) or step(*batch)
    trainer.fit()
    writer.close()
    print(json.dumps({"during": during, "after": product(), "meta": read_meta(writer.run_dir)["flush_denormal"]}))
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch flushes denormals on x86 only")
def test_training_flushes_subnormal_floats_to_zero_only_when_asked_and_only_while_it_trains(tmp_path):
    result = subprocess.run([sys.executable, "-c", TRAIN, str(tmp_path / "run_")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    kept, flushed = map(json.loads, result.stdout.strip().splitlines()[-2:])
    assert len(kept["during"]) == 2 and all(p > 0 for p in kept["during"])
    assert kept["meta"] is False and kept["after"] > 0
    assert flushed["during"] == [0.0, 0.0] and flushed["meta"] is True
    assert flushed["after"] > 0  # fit() put the IEEE behaviour back
