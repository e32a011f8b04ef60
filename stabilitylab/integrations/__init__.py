"""Callbacks that put `stabilitylab.Monitor` into other frameworks' training loops.

- `stabilitylab.integrations.lightning.StabilityMonitor`: PyTorch Lightning
  (`pip install 'stabilitylab[lightning]'`).
- `stabilitylab.integrations.huggingface.StabilityCallback`: the Hugging Face `Trainer`
  (`pip install 'stabilitylab[huggingface]'`).

Each module imports its framework, so import the one you use.
"""
