"""stabilitylab: training-stability diagnostics for self-supervised Vision Transformers.

>>> import stabilitylab as sl
>>> run = sl.load_run("runs/my_run")
>>> run.steps, run.layers, run.knn, run.events
>>> run.grad_norms()            # wide: step x layer
"""
from stabilitylab.run import Run, RunDirError, load_run, load_runs

__version__ = "0.1.0"
__all__ = ["Run", "RunDirError", "load_run", "load_runs", "__version__"]
