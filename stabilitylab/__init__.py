"""stabilitylab: training-stability diagnostics for self-supervised Vision Transformers.

>>> import stabilitylab as sl
>>> run = sl.load_run("runs/my_run")
>>> run.steps, run.layers, run.knn, run.events
>>> run.grad_norms()            # wide: step x layer
>>> sweep = sl.concat_runs(sl.load_runs("runs/sweep"), "knn")   # one frame, config columns
>>> with sl.Monitor(model, optimizer, "runs/mine") as monitor: ...   # any training loop

`Monitor` imports torch, so it loads on first use: `import stabilitylab` stays light.
"""
from stabilitylab.run import Run, RunDirError, concat_runs, load_run, load_runs

__version__ = "0.1.0"
__all__ = ["Monitor", "Run", "RunDirError", "concat_runs", "load_run", "load_runs", "__version__"]


def __getattr__(name):
    if name == "Monitor":
        from stabilitylab.monitor import Monitor

        return Monitor
    raise AttributeError(f"module 'stabilitylab' has no attribute {name!r}")
