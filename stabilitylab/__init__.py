"""stabilitylab: training-stability diagnostics for self-supervised Vision Transformers.

>>> import stabilitylab as sl
>>> run = sl.load_run("runs/my_run")
>>> run.steps, run.layers, run.knn, run.events
>>> run.grad_norms()            # wide: step x layer
>>> sweep = sl.concat_runs(sl.load_runs("runs/sweep"), "knn")   # one frame, config columns
"""
from stabilitylab.run import Run, RunDirError, concat_runs, load_run, load_runs

__version__ = "0.1.0"
__all__ = ["Run", "RunDirError", "concat_runs", "load_run", "load_runs", "__version__"]
