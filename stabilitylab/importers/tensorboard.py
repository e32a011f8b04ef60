"""TensorBoard event files -> scalars, with tensorboard's own event reader (EventAccumulator)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from stabilitylab.importers.core import BadLogError

EVENT_GLOB = "events.out.tfevents.*"


def event_dir(logdir: Path) -> Path:
    """The one directory (or file) holding the run's event files."""
    if logdir.is_file():
        if not logdir.name.startswith("events.out.tfevents."):
            raise BadLogError(f"{logdir} is not a TensorBoard event file (events.out.tfevents.*)")
        return logdir
    folders = sorted({p.parent for p in logdir.rglob(EVENT_GLOB)})
    if not folders:
        raise BadLogError(f"no TensorBoard event file ({EVENT_GLOB}) under {logdir}")
    if len(folders) > 1:
        shown = ", ".join(str(f) for f in folders[:3])
        raise BadLogError(f"{logdir} holds {len(folders)} TensorBoard runs; import one of them: {shown}")
    return folders[0]


def read_tensorboard(logdir) -> tuple[pd.DataFrame, dict]:
    """(scalars: step, tag, value in the order tags first appear; config from a Lightning
    hparams.yaml next to the events, if any)."""
    try:
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util
    except ImportError:
        raise BadLogError("reading TensorBoard logs needs tensorboard: "
                          "pip install 'stabilitylab[importers]'") from None
    logdir = Path(logdir)
    if not logdir.exists():
        raise FileNotFoundError(f"no such TensorBoard log: {logdir}")
    source = event_dir(logdir)
    accumulator = event_accumulator.EventAccumulator(
        str(source), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
    try:
        accumulator.Reload()
    except Exception as exc:  # the reader raises several types for a damaged file
        raise BadLogError(f"{source} is not a readable TensorBoard event file: {exc}".splitlines()[0]) from None
    frames = []
    tags = accumulator.Tags()
    for tag in tags.get("scalars", []):
        events = accumulator.Scalars(tag)
        frames.append(pd.DataFrame({"step": [e.step for e in events], "tag": tag,
                                    "value": [e.value for e in events]}))
    for tag in tags.get("tensors", []):  # TF2-style scalar summaries
        events = [e for e in accumulator.Tensors(tag) if not e.tensor_proto.tensor_shape.dim]
        if events:
            frames.append(pd.DataFrame({"step": [e.step for e in events], "tag": tag, "value": [
                float(tensor_util.make_ndarray(e.tensor_proto)) for e in events]}))
    if not frames:
        raise BadLogError(f"{source} holds no scalars (is it a TensorBoard event file?)")
    hparams = (source if source.is_dir() else source.parent) / "hparams.yaml"
    config = {}
    if hparams.is_file():
        import yaml

        config = yaml.safe_load(hparams.read_text()) or {}
    return pd.concat(frames, ignore_index=True), config
