"""Shared test setup: torch tests run on one thread with a fixed seed (2-core CI machines)."""
import sys

import pytest


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Only touches torch when a test module imported it: analysis tests stay torch-free."""
    torch = sys.modules.get("torch")
    if torch is None:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def train_one_and_two_processes(tmp_path):
    """`stabilitylab train OVERRIDES` in one process and in two gloo processes under torchrun
    (the same global batch), on one thread each; returns the two runs (one, two)."""
    import os
    import subprocess

    import stabilitylab as sl

    def train(overrides):
        overrides = [o for o in overrides if not o.startswith("threads")]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        single, double = tmp_path / "single", tmp_path / "ddp"
        subprocess.run([sys.executable, "-m", "stabilitylab", "train", "--out", str(single), *overrides],
                       env=env, check=True, capture_output=True, timeout=300)
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "stabilitylab", "train", "--out", str(double), *overrides],
            env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        one, two = sl.load_run(single), sl.load_run(double)
        assert two.meta["world_size"] == 2
        return one, two

    return train
