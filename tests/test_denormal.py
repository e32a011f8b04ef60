"""flush_denormal: on a CPU the trainer makes torch compute subnormal floats as 0, because x86
cores take far longer on them and collapsed attention makes many (docs/benchmarks.md). The
setting is process-wide, so the test builds its trainers in a process of its own: first with
flush_denormal=false, then true, each time multiplying a subnormal float after the build."""
import json
import os
import platform
import subprocess
import sys

import pytest

BUILD = """
import json, sys, torch
from stabilitylab.config import load_config
from trainer import Trainer
for flush in ("false", "true"):
    cfg = load_config(None, ["data.dataset=synthetic", "data.synthetic_size=64", "data.num_workers=0",
                             "optim.batch_size=32", "knn.enabled=false", "log.progress=false",
                             "threads=1", "flush_denormal=" + flush])
    trainer = Trainer(cfg, sys.argv[1])
    product = (torch.tensor([1e-39]) * torch.tensor([1.0])).item()  # 1e-39 is subnormal in fp32
    print(json.dumps({"product": product, "recorded": trainer.flush_denormal}))  # what fit() puts in meta.json
"""


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="torch flushes denormals on x86 only")
def test_the_trainer_flushes_subnormal_floats_to_zero_only_when_asked(tmp_path):
    result = subprocess.run([sys.executable, "-c", BUILD, str(tmp_path / "unused")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    kept, flushed = map(json.loads, result.stdout.split("\n")[:2])
    assert kept["product"] > 0 and kept["recorded"] is False
    assert flushed["product"] == 0.0 and flushed["recorded"] is True
