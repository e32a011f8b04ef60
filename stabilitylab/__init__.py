"""stabilitylab: training-stability diagnostics for self-supervised Vision Transformers.

>>> import stabilitylab as sl
>>> run = sl.load_run("runs/my_run")
>>> run.steps, run.layers, run.knn, run.events
>>> run.grad_norms()            # wide: step x layer
>>> sweep = sl.concat_runs(sl.load_runs("runs/sweep"), "knn")   # one frame, config columns
>>> with sl.Monitor(model, optimizer, "runs/mine") as monitor: ...   # any training loop

Every name loads on first use (`Monitor` imports torch, the rest pandas), so that `import
stabilitylab` stays light.
"""
import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what static tools and IDEs see
    from stabilitylab.monitor import Monitor
    from stabilitylab.run import Run, RunDirError, concat_runs, load_run, load_runs

__version__ = "0.1.0"
__all__ = ["Monitor", "Run", "RunDirError", "concat_runs", "load_run", "load_runs", "__version__"]
_MODULE_OF = {"Monitor": "stabilitylab.monitor", "Run": "stabilitylab.run", "RunDirError": "stabilitylab.run",
              "concat_runs": "stabilitylab.run", "load_run": "stabilitylab.run", "load_runs": "stabilitylab.run"}


def __getattr__(name):
    if name in _MODULE_OF:
        return getattr(importlib.import_module(_MODULE_OF[name]), name)
    raise AttributeError(f"module 'stabilitylab' has no attribute {name!r}")


def __dir__():
    return sorted({*globals(), *__all__})
