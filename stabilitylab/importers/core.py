"""Scalars logged by other tools -> a run directory: the tag conventions and the writing.

Every reader produces one long frame of scalars (step, tag, value) in the order the tags
first appear in the log (W&B keeps no such order: natural name order), plus the run's config; `write_imported_run` maps tags to the
run-directory columns and writes them through `RunWriter`. Tag conventions mapped without
options (`KNOWN_TAGS`):

- per-parameter gradient norms: Lightning's `grad_2.0_norm/<param>` (and
  `grad_inf_norm/<param>` as grad_max_abs), OLMo's `grad/<param>.norm`; they are combined
  into the automatic layer groups of `trainer.groups` (the Monitor's) as the L2 norm of the
  members (max for grad_max_abs); a parameter not logged at a step counts as zero;
- stabilitylab's own per-group names: `grad_l2/<group>`, `grad_max_abs/<group>`,
  `param_l2/<group>`, `update_l2/<group>` (already groups: not regrouped);
- total gradient norm: `grad_2.0_norm_total` (Lightning), `optim/total_grad_norm` (OLMo),
  `grad_norm`, `train/grad_norm` (Hugging Face);
- loss and lr by common names (`loss`, `train/loss`, `train_loss`, `train_loss_step`,
  `lr`, `learning_rate`, `train/learning_rate`, `lr-AdamW` of Lightning's
  LearningRateMonitor, OLMo's `optim/learning_rate_group0`), `epoch`, `momentum`.

Anything else through maps `TABLE.COLUMN=TAG_REGEX` (tried before the conventions):
`steps.COLUMN` takes the first matching tag; `layers.COLUMN` needs a regex group capturing
the parameter name (`layers.grad_l2=^gn/(.+)$`); `knn.top1` (or top5, n_queries) makes one
curve per matching tag, its source the regex's first group or else the tag.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.layers import BLOCK

LAYER_COLUMNS = ("grad_l2", "grad_max_abs", "param_l2", "update_l2")
STEP_COLUMNS = ("loss", "lr", "grad_norm", "epoch", "momentum", "loss_scale")
KNN_COLUMNS = ("top1", "top5", "n_queries")


class BadLogError(ValueError):
    """A log that cannot be imported as asked (one line: what to fix); the CLI exits 2."""

    user_error = True


@dataclass(frozen=True)
class TagMap:
    """One mapping: tags matching `pattern` fill `table.column` (per parameter: `per_param`)."""

    table: str
    column: str
    pattern: re.Pattern
    per_param: bool = False  # layers: the regex's group is a parameter name, to be grouped

    @classmethod
    def parse(cls, text: str) -> "TagMap":
        """`TABLE.COLUMN=TAG_REGEX` as given to --map."""
        target, sep, regex = text.partition("=")
        table, _, column = target.partition(".")
        allowed = {"steps": STEP_COLUMNS, "layers": LAYER_COLUMNS, "knn": KNN_COLUMNS}
        if not sep or table not in allowed or column not in allowed[table]:
            raise BadLogError(f"--map {text!r}: use TABLE.COLUMN=TAG_REGEX with TABLE.COLUMN one of "
                              + ", ".join(f"{t}.{c}" for t, cs in allowed.items() for c in cs))
        try:
            pattern = re.compile(regex)
        except re.error as exc:
            raise BadLogError(f"--map {text!r}: bad regex: {exc}") from None
        if table == "layers" and pattern.groups < 1:
            raise BadLogError(f"--map {text!r}: a layers map needs a regex group capturing the "
                              "parameter name, e.g. layers.grad_l2=^gradnorm/(.+)$")
        return cls(table, column, pattern, per_param=table == "layers")


def _known(table, column, regex, per_param=False) -> TagMap:
    return TagMap(table, column, re.compile(regex), per_param)


KNOWN_TAGS = [
    _known("layers", "grad_l2", r"^grad_2(?:\.0)?_norm/(.+)$", True),  # Lightning grad_norm
    _known("layers", "grad_max_abs", r"^grad_inf_norm/(.+)$", True),
    _known("layers", "grad_l2", r"^grad/(.+)\.norm$", True),  # OLMo
    *[_known("layers", c, rf"^{c}/(.+)$") for c in LAYER_COLUMNS],  # stabilitylab's groups
    _known("steps", "grad_norm", r"^(?:grad_2(?:\.0)?_norm_total|optim/total_grad_norm|"
                                 r"(?:train[/_.])?grad_norm)$"),
    _known("steps", "loss", r"^(?:train(?:ing)?[/_.])?loss(?:_step)?$"),
    _known("steps", "lr", r"^(?:(?:train[/_.])?(?:lr|learning_rate)|lr-[^/]+|optim/learning_rate_group0)$"),
    _known("steps", "epoch", r"^epoch$"),
    _known("steps", "momentum", r"^momentum$"),
]


def classify(tags: list[str], maps: list[TagMap]) -> dict[str, tuple[TagMap, re.Match]]:
    """tag -> (the map it fills, its match); the user's maps first, then KNOWN_TAGS.

    A steps column takes only its first matching tag (the others stay unused).
    """
    taken, out = set(), {}
    for tag in tags:
        for tag_map in [*maps, *KNOWN_TAGS]:
            match = tag_map.pattern.search(tag)
            if match is None:
                continue
            if tag_map.table == "steps":
                if (tag_map.table, tag_map.column) in taken:
                    continue
                taken.add((tag_map.table, tag_map.column))
            out[tag] = (tag_map, match)
            break
    return out


def _layers(scalars: pd.DataFrame, assigned: dict, groups: dict | None):
    """The layers table: per-parameter norms combined into groups, per-group ones as they are."""
    from trainer.groups import group_parameters  # pure Python: no torch

    rows = []
    for tag, (tag_map, match) in assigned.items():
        if tag_map.table == "layers":
            rows.append((tag, tag_map.column, match.group(1), tag_map.per_param))
    if not rows:
        return None, None, None
    meta = pd.DataFrame(rows, columns=["tag", "column", "name", "per_param"])
    params = list(dict.fromkeys(meta.loc[meta["per_param"], "name"]))
    grouping = group_parameters(params, groups) if params else None
    meta["layer"] = [grouping.group_of(n) if p else n for n, p in zip(meta["name"], meta["per_param"])]
    long = scalars.merge(meta[["tag", "column", "layer"]], on="tag")
    is_max = long["column"] == "grad_max_abs"
    keys = ["step", "layer", "column"]
    l2 = long[~is_max].assign(value=long["value"] ** 2).groupby(keys, sort=False)["value"].sum() ** 0.5
    wide = pd.concat([l2, long[is_max].groupby(keys, sort=False)["value"].max()]).unstack("column")
    order = (grouping.names if grouping else []) + [l for l in dict.fromkeys(meta["layer"])
                                                     if not grouping or l not in grouping.names]
    wide = wide.reset_index()
    wide["layer"] = pd.Categorical(wide["layer"], categories=order, ordered=True)
    wide = wide.sort_values(["step", "layer"]).reset_index(drop=True)
    columns = {"step": wide["step"].to_numpy(np.int64), "layer": wide["layer"].astype(str).to_numpy(object)}
    columns.update({c: wide[c].to_numpy(float) for c in LAYER_COLUMNS if c in wide})
    first = grouping.first_layer if grouping else order[0]
    last = grouping.last_block if grouping else next(
        (layer for layer in reversed(order) if BLOCK.fullmatch(layer)), None)
    return columns, first, last


def _steps(scalars: pd.DataFrame, assigned: dict, extra_steps) -> dict | None:
    tags = {tag_map.column: tag for tag, (tag_map, _) in assigned.items() if tag_map.table == "steps"}
    picked = scalars[scalars["tag"].isin(tags.values())]
    wide = picked.pivot_table(index="step", columns="tag", values="value", aggfunc="last")
    index = wide.index.union(pd.Index(extra_steps, dtype=np.int64)).sort_values()
    if not len(index):
        return None
    wide = wide.reindex(index)
    columns = {"step": index.to_numpy(np.int64)}
    columns.update({column: wide[tag].to_numpy(float) for column, tag in tags.items()})
    return columns


def _knn(scalars: pd.DataFrame, assigned: dict) -> dict | None:
    rows = [(tag, tag_map.column, match.group(1) if tag_map.pattern.groups else tag)
            for tag, (tag_map, match) in assigned.items() if tag_map.table == "knn"]
    if not rows:
        return None
    meta = pd.DataFrame(rows, columns=["tag", "column", "source"])
    long = scalars.merge(meta, on="tag")
    wide = long.pivot_table(index=["step", "source"], columns="column", values="value",
                            aggfunc="last").reset_index().sort_values(["step", "source"])
    columns = {"step": wide["step"].to_numpy(np.int64), "source": wide["source"].tolist()}
    columns.update({c: wide[c].to_numpy(float) for c in KNN_COLUMNS if c in wide})
    return columns


def refuse_existing(out) -> Path:
    """`out` as a Path, if it is free for a new run directory (missing or an empty folder)."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists; pick another --out (nothing is overwritten)")
    return out


def write_imported_run(scalars: pd.DataFrame, out, *, source: str, origin, config: dict | None = None,
                       maps: list[TagMap] = (), groups: dict | None = None) -> dict:
    """Write `scalars` (step, tag, value; tags in log order) as a new run directory `out`.

    Returns a short description: {"steps", "layers" (group names), "unused" (tags), ...}.
    """
    from stabilitylab.rundir import CONFIG_FILE, RunWriter, atomic_write_text, utc_now, write_meta

    out = refuse_existing(out)
    scalars = scalars.dropna(subset=["value"])
    scalars = scalars.astype({"step": np.int64, "value": float})
    tags = list(dict.fromkeys(scalars["tag"]))
    assigned = classify(tags, list(maps))
    if not any(m.table in ("layers", "steps") and m.column != "epoch" for m, _ in assigned.values()):
        shown = ", ".join(tags[:5]) + (", ..." if len(tags) > 5 else "")
        raise BadLogError(f"no known tag among the {len(tags)} in {origin} ({shown}): "
                          "map them with --map TABLE.COLUMN=TAG_REGEX")
    layers, first, last = _layers(scalars, assigned, groups)
    steps = _steps(scalars, assigned, [] if layers is None else np.unique(layers["step"]))
    knn = _knn(scalars, assigned)

    writer = RunWriter(out)
    if config:
        import yaml

        atomic_write_text(out / CONFIG_FILE, yaml.safe_dump(config, sort_keys=False))
    if steps:
        writer.append("steps", steps)
    if layers:
        writer.append("layers", layers)
    if knn:
        writer.append("knn", knn)
    writer.event(int(steps["step"][0]) if steps else 0, "imported", f"from {source}: {origin}")
    import stabilitylab

    now = utc_now().isoformat()
    write_meta(out, {"stabilitylab": stabilitylab.__version__, "source": source,
                     "imported_from": str(origin), "first_layer": first, "last_block": last,
                     "status": "finished", "start_time": now, "end_time": now})
    writer.close()
    return {"steps": 0 if not steps else len(steps["step"]),
            "layers": [] if not layers else list(dict.fromkeys(layers["layer"])),
            "knn": sorted(set(knn["source"])) if knn else [],
            "unused": [t for t in tags if t not in assigned]}
