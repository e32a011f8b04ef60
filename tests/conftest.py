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
