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

__version__ = "0.1.0"
_HOMES = {"Monitor": "stabilitylab.monitor", "Run": "stabilitylab.run", "RunDirError": "stabilitylab.run",
          "concat_runs": "stabilitylab.run", "load_run": "stabilitylab.run", "load_runs": "stabilitylab.run"}
__all__ = [*_HOMES, "__version__"]


def __getattr__(name):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'stabilitylab' has no attribute {name!r}")
