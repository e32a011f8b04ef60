"""`stabilitylab import`: runs logged by other tools (TensorBoard, a metrics CSV, an offline
W&B folder) become run directories that `analyze`, `compare` and `report` read unchanged.

Readers turn a log into scalars (step, tag, value); `core.write_imported_run` maps the tag
conventions (Lightning, OLMo, Hugging Face, stabilitylab's own) and `--map` rules to the run
directory's columns, and combines per-parameter norms into the Monitor's layer groups.
The readers and pandas load only when a log is imported, not for every CLI command.
"""
from __future__ import annotations

__all__ = ["import_run", "add_import_parser", "cmd_import"]
SOURCES = ("tensorboard", "csv", "wandb")


def import_run(source: str, path, out, *, maps=(), groups=None, **reader_options) -> dict:
    """Import the log at `path` (source: tensorboard | csv | wandb) as run directory `out`.

    maps: `TABLE.COLUMN=TAG_REGEX` texts; groups: {regex: group name} overriding the automatic
    layer groups; reader_options: csv's step / tag / value column names. Returns what was
    imported (see `write_imported_run`).
    """
    from stabilitylab.importers.core import BadLogError, TagMap, refuse_existing, write_imported_run

    if source == "tensorboard":
        from stabilitylab.importers.tensorboard import read_tensorboard as read
    elif source == "csv":
        from stabilitylab.importers.csv import read_csv as read
    elif source == "wandb":
        from stabilitylab.importers.wandb import read_wandb as read
    else:
        raise BadLogError(f"unknown source {source!r}: use one of {', '.join(SOURCES)}")
    tag_maps = [TagMap.parse(m) for m in maps]
    refuse_existing(out)  # before reading a log that may be large
    scalars, config = read(path, **reader_options)
    return write_imported_run(scalars, out, source=source, origin=path, config=config,
                              maps=tag_maps, groups=groups)


EPILOG = """examples:
  stabilitylab import tensorboard lightning_logs/version_0 --out runs/imported
  stabilitylab import tensorboard tb/ --out runs/x --map steps.loss=^train/nll$ \\
      --map "layers.grad_l2=^gradnorm/(.+)$" --map knn.top1=^val/acc$
  stabilitylab import csv metrics.csv --out runs/from_csv --step global_step
  stabilitylab import wandb wandb/offline-run-20250101_120000-abc123 --out runs/from_wandb

Known tags, mapped without options: Lightning grad_2.0_norm/<param> and grad_2.0_norm_total,
OLMo grad/<param>.norm and optim/total_grad_norm, stabilitylab's grad_l2/<group>, and loss,
lr, learning_rate, train/loss, train_loss, lr-<Optimizer>, epoch. Per-parameter norms are
combined into the same layer groups as stabilitylab.Monitor (L2 of the members)."""


def add_import_parser(sub) -> None:
    parser = sub.add_parser(
        "import", help="turn a TensorBoard, CSV or offline W&B log into a run directory",
        description="Import the scalars of another tool's log as a run directory: per-layer "
                    "gradient norms, loss, lr and eval curves become the tables `analyze`, "
                    "`compare` and `report` read.",
        epilog=EPILOG)
    parser.add_argument("source", choices=SOURCES, help="the kind of log")
    parser.add_argument("path", metavar="LOG", help="TensorBoard log dir or event file, CSV file, "
                                                    "or W&B offline-run-* folder")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="new run directory to write")
    parser.add_argument("--map", action="append", default=[], metavar="TABLE.COLUMN=TAG_REGEX",
                        help="map tags to a column (repeatable): steps.loss=..., "
                             "layers.grad_l2=...(param)..., knn.top1=...")
    parser.add_argument("--group", action="append", default=[], metavar="REGEX=NAME",
                        help="put parameters matching REGEX in layer group NAME (repeatable)")
    parser.add_argument("--step", metavar="COL", help="csv: the step column (default: step, "
                                                      "global_step, _step, iteration)")
    parser.add_argument("--tag", metavar="COL", help="csv, long format: the tag column")
    parser.add_argument("--value", metavar="COL", help="csv, long format: the value column")


def cmd_import(args) -> int:
    from stabilitylab.importers.core import BadLogError

    if args.source != "csv" and (args.step or args.tag or args.value):
        raise BadLogError("--step, --tag and --value are for `import csv`")
    bad = [g for g in args.group if "=" not in g]
    if bad:
        raise BadLogError(f"--group {bad[0]!r}: use REGEX=NAME")
    groups = dict(g.rsplit("=", 1) for g in args.group) or None
    options = {k: v for k, v in (("step", args.step), ("tag", args.tag), ("value", args.value)) if v}
    result = import_run(args.source, args.path, args.out, maps=args.map, groups=groups, **options)
    print(f"run directory: {args.out} ({result['steps']} steps; layer groups: "
          f"{', '.join(result['layers']) or 'none'}"
          + (f"; curves: {', '.join(result['knn'])}" if result["knn"] else "") + ")")
    if result["unused"]:
        shown = ", ".join(result["unused"][:6]) + (", ..." if len(result["unused"]) > 6 else "")
        print(f"not imported ({len(result['unused'])} tags): {shown}  (map them with --map)")
    print(f"next: stabilitylab report {args.out}")
    return 0
