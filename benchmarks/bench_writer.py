"""Figure 5 -- logging: rows/s of the run writer and bytes per row of the `layers` table on disk.

    python benchmarks/bench_writer.py --quick    # 10,000 steps x 15 groups (a few seconds)
    python benchmarks/bench_writer.py            # 375,000 steps x 15 groups = 5.6M rows, and
                                                 #   37,500 steps x 150 parameters
    python benchmarks/bench_writer.py --real RUN_DIR   # also re-encode a real run's layers table

Rows/s: `RunWriter.append` of numpy columns exactly as `GradientProbe.drain` returns them
(int64 step, object array of layer names, four float32 columns), one append + one `flush`
(= one Parquet part file) per 500 steps as the trainer does, timed end to end; then
`close()` (compaction into one file) separately. Bytes/row: file sizes on disk over rows,
for the part files as a run leaves them while training and for the compacted table.

Two kinds of data: "noise" (iid lognormal float32: 16 bytes of incompressible mantissa
noise per row) and "walk" (per-layer mean-reverting lognormal random walks with the
step-to-step spread of log-norms measured on data_samples/runs/learned_lr1e-2: grad_l2 0.2, grad_max_abs 0.3,
update_l2 0.2, param_l2 1e-4 -- gradient statistics are noisy step to step, weights smooth). The compacted
table is then rewritten under other Parquet settings to show what each buys; settings marked
"lossy" change the values and are what-ifs for discussion, not what the writer does.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from scipy import signal  # noqa: E402

from stabilitylab import rundir  # noqa: E402
from stabilitylab.rundir import RunWriter  # noqa: E402

FLOATS = ("grad_l2", "grad_max_abs", "param_l2", "update_l2")
WALK_SIGMA = {"grad_l2": 0.2, "grad_max_abs": 0.3, "param_l2": 1e-4, "update_l2": 0.2}
FLUSH_STEPS = 500


def result(figure: str, value: str, goal: str = "", status: str = "") -> None:
    print(f"RESULT | {figure} | {value} | {goal} | {status}", flush=True)


def layer_names(n: int) -> list[str]:
    if n <= 20:  # layer groups: patch_embed, cls_token, blocks.*, norm, projector, predictor
        return ["patch_embed", "cls_token"] + [f"blocks.{i}" for i in range(n - 5)] + ["norm", "projector", "predictor"]
    # per-parameter names, as with log.per_param=true
    suffixes = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias"]
    names = ["backbone.patch_embed.proj.weight", "backbone.patch_embed.proj.bias", "backbone.cls_token"]
    block = 0
    while len(names) < n:
        names += [f"backbone.blocks.{block}.{s}" for s in suffixes]
        block += 1
    return names[:n]


class Source:
    """Chunks of `layers` columns; the per-layer series continue across chunks.

    noise: iid lognormal (sigma 1 in log) around a per-layer scale.
    walk: per-layer mean-reverting lognormal random walks, log x_t = mu + PHI (log x_{t-1} - mu)
    + sigma eps, sigma per column from WALK_SIGMA (PHI = 0.99: a plain random walk at these
    sigmas would leave the float32 range within a 375,000-step run).
    """

    PHI = 0.99

    def __init__(self, kind: str, n_layers: int, seed: int = 0):
        self.kind, self.n_layers = kind, n_layers
        self.names = np.asarray(layer_names(n_layers), dtype=object)
        self.rng = np.random.default_rng(seed)
        self.mu = {c: np.log(np.logspace(-1, -3, n_layers)) for c in FLOATS}
        self.mu["param_l2"] = np.log(np.linspace(5, 50, n_layers))
        self.dev = {c: np.zeros(n_layers) for c in FLOATS}  # log x - mu of the last step

    def chunk(self, start: int, n_steps: int) -> dict:
        step = np.arange(start, start + n_steps, dtype=np.int64)
        cols = {"step": np.repeat(step, self.n_layers), "layer": np.tile(self.names, n_steps)}
        for c in FLOATS:
            shape = (n_steps, self.n_layers)
            if self.kind == "noise":
                values = np.exp(self.mu[c] + self.rng.standard_normal(shape))
            else:
                eps = WALK_SIGMA[c] * self.rng.standard_normal(shape)
                dev, _ = signal.lfilter([1.0], [1.0, -self.PHI], eps, axis=0,
                                        zi=self.PHI * self.dev[c][None, :])  # AR(1)
                self.dev[c] = dev[-1]
                values = np.exp(self.mu[c] + dev)
            cols[c] = values.astype(np.float32).ravel()
        return cols


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.parquet") if not p.name.startswith("."))


def _write_no_float_dictionary(table: pa.Table, path: Path) -> None:
    """What-if: stabilitylab.rundir.write_parquet_atomic with dictionary encoding limited to
    the non-float columns, so byte_stream_split actually applies to the floats (as durable:
    file and folder fsynced)."""
    tmp = path.with_name(f".{path.name}.tmp")
    floats = [f.name for f in table.schema if pa.types.is_floating(f.type)]
    others = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
    with open(tmp, "wb") as f:
        pq.write_table(table, f, compression="zstd", use_dictionary=others,
                       use_byte_stream_split=floats or False)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    os.fsync(folder)
    os.close(folder)


def write_run(root: Path, source: Source, n_steps: int, what_if: str | None = None,
              flush_steps: int = FLUSH_STEPS) -> dict:
    """Append + flush every `flush_steps` steps, timed; then close() (compaction), timed.

    what_if (benchmark only): "float dictionary off" swaps the writer's Parquet call for
    `_write_no_float_dictionary`; "no fsync" makes os.fsync a no-op (not durable: the cost
    of the writer's fsyncs, 2 per part + 2 for the segments.json commit of each flush).
    """
    if what_if:
        name, replacement = {"float dictionary off": ("write_parquet_atomic", _write_no_float_dictionary),
                             "no fsync": ("fsync", lambda fd: None)}[what_if]
        module = rundir if name == "write_parquet_atomic" else os
        original = getattr(module, name)
        setattr(module, name, replacement)
        try:
            return write_run(root, source, n_steps, flush_steps=flush_steps)
        finally:
            setattr(module, name, original)
    chunks = [source.chunk(s, min(flush_steps, n_steps - s)) for s in range(0, n_steps, flush_steps)]
    rows = sum(len(c["step"]) for c in chunks)
    writer = RunWriter(root, flush_every_steps=flush_steps)
    t_append = t_flush = 0.0
    for c in chunks:
        t0 = time.perf_counter()
        writer.append("layers", c)
        t1 = time.perf_counter()
        writer.flush(int(c["step"][-1]))
        t_flush += time.perf_counter() - t1
        t_append += t1 - t0
    part_bytes = dir_bytes(root / "layers")
    t0 = time.perf_counter()
    writer.close()
    t_close = time.perf_counter() - t0
    return dict(rows=rows, parts=len(chunks), t_append=t_append, t_flush=t_flush, t_close=t_close,
                part_bytes=part_bytes, compact_bytes=dir_bytes(root / "layers"))


def compacted_table(root: Path) -> pa.Table:
    files = sorted((root / "layers").rglob("part-*.parquet"))
    return pa.concat_tables(pq.read_table(f) for f in files)


def _round_mantissa(table: pa.Table, keep_bits: int) -> pa.Table:
    """Float columns rounded to `keep_bits` mantissa bits (lossy what-if)."""
    out = table
    drop = 23 - keep_bits
    for c in FLOATS:
        arr = table[c].combine_chunks()
        values = arr.to_numpy(zero_copy_only=False).astype(np.float32)
        bits = values.view(np.uint32)
        bits = (bits + np.uint32(1 << (drop - 1))) & np.uint32((0xFFFFFFFF >> drop) << drop)
        rounded = pa.array(bits.view(np.float32), pa.float32(), mask=arr.is_null().to_numpy(zero_copy_only=False))
        out = out.set_column(out.schema.get_field_index(c), c, rounded)
    return out


SETTINGS = {
    # name: (row order, transform, write_table kwargs)
    "writer today (zstd, dictionary on, BSS requested)":
        ("step", None, dict(compression="zstd", use_byte_stream_split=list(FLOATS))),
    "zstd, no float dictionary, BSS":
        ("step", None, dict(compression="zstd", use_dictionary=["step", "layer"], use_byte_stream_split=list(FLOATS))),
    "zstd-9, no float dictionary, BSS":
        ("step", None, dict(compression="zstd", compression_level=9, use_dictionary=["step", "layer"],
                            use_byte_stream_split=list(FLOATS))),
    "zstd, no float dictionary, plain":
        ("step", None, dict(compression="zstd", use_dictionary=["step", "layer"])),
    "snappy, no float dictionary, BSS":
        ("step", None, dict(compression="snappy", use_dictionary=["step", "layer"], use_byte_stream_split=list(FLOATS))),
    "zstd, no float dictionary, BSS, rows by (layer, step)":
        ("layer", None, dict(compression="zstd", use_dictionary=["step", "layer"], use_byte_stream_split=list(FLOATS))),
    "lossy: 10-bit mantissa (fp16 precision), BSS, zstd":
        ("step", 10, dict(compression="zstd", use_dictionary=["step", "layer"], use_byte_stream_split=list(FLOATS))),
    "lossy: 7-bit mantissa (bf16 precision), BSS, zstd":
        ("step", 7, dict(compression="zstd", use_dictionary=["step", "layer"], use_byte_stream_split=list(FLOATS))),
}


def settings_table(table: pa.Table, tmp: Path) -> list[tuple[str, float, float]]:
    """(setting, bytes/row, write MB/s of raw float data) for each of SETTINGS."""
    out = []
    codes = table["layer"].unify_dictionaries().combine_chunks().indices.to_numpy(zero_copy_only=False)
    by_layer = table.take(pa.array(np.lexsort((table["step"].to_numpy(), codes))))
    for name, (order, bits, kwargs) in SETTINGS.items():
        t = by_layer if order == "layer" else table
        if bits is not None:
            t = _round_mantissa(t, bits)
        path = tmp / "setting.parquet"
        t0 = time.perf_counter()
        pq.write_table(t, path, **kwargs)
        seconds = time.perf_counter() - t0
        out.append((name, path.stat().st_size / t.num_rows, t.num_rows / seconds))
    return out


def float_encodings(root: Path) -> str:
    meta = pq.ParquetFile(next((root / "layers").rglob("part-*.parquet"))).metadata
    col = meta.row_group(0).column(meta.schema.names.index("grad_l2"))
    return ", ".join(col.encodings)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10,000 steps x 15 groups only")
    parser.add_argument("--steps", type=int, help="steps of the 15-group case (default 375,000; quick 10,000)")
    parser.add_argument("--real", metavar="RUN_DIR", help="also re-encode this run's layers table")
    args = parser.parse_args(argv)
    n_steps = args.steps or (10_000 if args.quick else 375_000)
    # (layers, steps, steps per flush): the trainer flushes every 500 steps; the last case
    # writes 25,000 steps per file to show the bulk rate without the per-file overhead
    cases = [(15, n_steps, FLUSH_STEPS)] + ([] if args.quick else [
        (150, n_steps // 10, FLUSH_STEPS), (15, n_steps, 25_000)])
    try:
        load = f", load {os.getloadavg()[0]:.2f}"
    except OSError:
        load = ""
    print(f"figure 5: run writer, layers table -- pyarrow {pa.__version__}, {os.cpu_count()} cpus{load}")
    print("raw size of a row: step 8 B + layer code 2 B + 4 x float32 = 26 B (16 B of floats)")

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for kind in ("noise", "walk"):
            for n_layers, steps, flush_steps in cases:
                root = tmp / f"{kind}-{n_layers}-{flush_steps}"
                r = write_run(root, Source(kind, n_layers), steps, flush_steps=flush_steps)
                rate = r["rows"] / (r["t_append"] + r["t_flush"])
                part_bpr, comp_bpr = r["part_bytes"] / r["rows"], r["compact_bytes"] / r["rows"]
                print(f"{kind:5s} {steps:,} steps x {n_layers} = {r['rows']:,} rows in {r['parts']} flushes "
                      f"of {flush_steps} steps: "
                      f"{rate / 1e6:.2f} M rows/s (append {r['t_append']:.2f} s + flush {r['t_flush']:.2f} s; "
                      f"compaction {r['t_close']:.2f} s); {part_bpr:.2f} B/row as parts, "
                      f"{comp_bpr:.2f} B/row compacted")
                result(f"5 writer rows/s, {kind}, {n_layers} layers x {flush_steps} steps per flush",
                       f"{rate / 1e6:.2f} M rows/s", ">= 2M rows/s", verdict(args.quick, rate >= 2e6))
                result(f"5 layers bytes/row, {kind}, {n_layers} layers (parts / compacted)",
                       f"{part_bpr:.2f} / {comp_bpr:.2f} B/row", "<= 4 B/row", verdict(args.quick, comp_bpr <= 4))
                if (n_layers, flush_steps) == (15, FLUSH_STEPS):
                    print(f"  float column encodings written: {float_encodings(root)}")
                    w = write_run(tmp / f"{kind}-{n_layers}-whatif", Source(kind, n_layers), steps,
                                  what_if="float dictionary off")
                    w_rate = w["rows"] / (w["t_append"] + w["t_flush"])
                    print(f"  what-if, writer with dictionary encoding off for float columns: "
                          f"{w_rate / 1e6:.2f} M rows/s; {w['part_bytes'] / w['rows']:.2f} B/row as parts, "
                          f"{w['compact_bytes'] / w['rows']:.2f} B/row compacted")
                    result(f"5 what-if writer, float dictionary off, {kind}, {n_layers} layers",
                           f"{w_rate / 1e6:.2f} M rows/s; {w['compact_bytes'] / w['rows']:.2f} B/row compacted",
                           ">= 2M rows/s, <= 4 B/row", "info")
                    n = write_run(tmp / f"{kind}-{n_layers}-nofsync", Source(kind, n_layers), steps,
                                  what_if="no fsync")
                    n_rate = n["rows"] / (n["t_append"] + n["t_flush"])
                    fsync_ms = (r["t_flush"] - n["t_flush"]) / r["parts"] * 1e3
                    print(f"  what-if, os.fsync off (not durable): {n_rate / 1e6:.2f} M rows/s; the fsyncs "
                          f"cost {fsync_ms:.1f} ms per flush")
                    result(f"5 what-if writer, fsync off (not durable), {kind}, {n_layers} layers",
                           f"{n_rate / 1e6:.2f} M rows/s; fsyncs {fsync_ms:.1f} ms per flush", "", "info")
                    for name, bpr, rps in settings_table(compacted_table(root), tmp):
                        print(f"  {name:55s} {bpr:6.2f} B/row  (write {rps / 1e6:5.1f} M rows/s)")
        if args.real:
            from stabilitylab.rundir import read_table

            table = read_table(args.real, "layers", as_arrow=True)
            print(f"real run {args.real}: {table.num_rows:,} rows")
            for name, bpr, rps in settings_table(table, tmp):
                print(f"  {name:55s} {bpr:6.2f} B/row  (write {rps / 1e6:5.1f} M rows/s)")
                if name.startswith("writer today"):
                    result("5 layers bytes/row, real run re-encoded as the writer does", f"{bpr:.2f} B/row",
                           "<= 4 B/row", verdict(False, bpr <= 4))
    return 0


def verdict(quick: bool, ok: bool) -> str:
    return "info" if quick else ("met" if ok else "NOT met")


if __name__ == "__main__":
    sys.exit(main())
