"""Figure 2 -- the dense kNN monitor: cost of one queue evaluation and its share of training
time at `knn.every`, and faiss vs torch vs scikit-learn brute force on the same features.

    python benchmarks/bench_knn.py --quick      # narrowed tiny model, small sizes (< 1 min)
    python benchmarks/bench_knn.py              # CPU preset: tiny ViT, batch 128, queue 500
                                                #   (0.1 x 5,000 sample images), 1,000 queries;
                                                #   backends also at ImageNet/ViT-S size
    python benchmarks/bench_knn.py --device cuda --model vit_small --img 224 --batch 256 \\
        --precision bf16                        # queue 128,116 (0.1 x ImageNet), 5,000 queries

A queue evaluation is exactly what the training loop runs every `knn.every` steps
(`Trainer.evaluate_queue_knn`): a forward pass of the `val_size` held-out images kept on the
device, then weighted kNN (k=20, T=0.07) of their features against the full FIFO queue. Its
share of training time is t_eval / (t_eval + every * t_step), with t_step the median of
instrumented training steps on a fixed batch. The images are random tensors and the queue
holds random class-structured features (the cost does not depend on the values). The
backend comparison runs `trainer.knn.knn_predict` with backend="torch" and "faiss" and
scikit-learn's brute-force cosine NearestNeighbors (same voting) on the same bank and
queries, and checks that the predicted classes agree.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_overhead import (add_model_args, build_trainer, config_from_args, describe,  # noqa: E402
                            fixed_batch, machine, quick_model, result, sync, timed_steps, verdict)
from trainer.knn import KnnMonitor, knn_predict  # noqa: E402

IMAGENET_TRAIN = 1_281_167


def timed(fn, device, repeats: int, clock: str) -> tuple[float, object]:
    """(median seconds over `repeats` calls after one warm-up call, last return value)."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.process_time() if clock == "cpu" else time.perf_counter()
        out = fn()
        sync(device)
        times.append((time.process_time() if clock == "cpu" else time.perf_counter()) - t0)
    return statistics.median(times), out


def class_features(n: int, dim: int, num_classes: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random features clustered by class (centroid + noise), and their labels. With noise 3
    per dimension, 384 dimensions, 1,000 classes and a 128,116 bank, weighted kNN is right
    about 80% of the time: neither trivial nor chance, so predictions depend on the neighbours."""
    g = torch.Generator().manual_seed(1234)  # same centroids for bank and queries
    centroids = torch.randn(num_classes, dim, generator=g)
    g.manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    feats = centroids[labels] + 3.0 * torch.randn(n, dim, generator=g)
    return feats.to(device), labels.to(device)


def fill_queue(monitor: KnnMonitor, num_classes: int, device) -> None:
    size, dim = monitor.features.shape
    feats, labels = class_features(size, dim, num_classes, seed=1, device=device)
    for start in range(0, size, 65536):
        monitor.enqueue(feats[start:start + 65536], labels[start:start + 65536])


def sklearn_predict(bank: np.ndarray, bank_labels: np.ndarray, query: np.ndarray, *, k: int,
                    temperature: float, num_classes: int) -> np.ndarray:
    """Brute-force cosine kNN with scikit-learn, voting exactly as knn_predict does."""
    from sklearn.neighbors import NearestNeighbors

    nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric="cosine").fit(bank)
    dist, idx = nn.kneighbors(query)
    weights = np.exp((1.0 - dist) / temperature)
    scores = np.zeros((len(query), num_classes), dtype=np.float64)
    np.add.at(scores, (np.arange(len(query))[:, None], bank_labels[idx]), weights)
    return scores


def compare_backends(bank, bank_labels, queries, query_labels, *, k, temperature, num_classes,
                     repeats, clock) -> list[dict]:
    """Time each available backend on the same features; predictions vs the torch backend.

    On a CPU device every backend gets torch's thread count (faiss's OpenMP pool and the
    BLAS under scikit-learn are limited to it), so the times compare like with like.
    """
    limits = None
    if not bank.is_cuda:
        try:
            from threadpoolctl import threadpool_limits
            limits = threadpool_limits(limits=torch.get_num_threads())
        except ImportError:
            pass
    try:
        return _compare_backends(bank, bank_labels, queries, query_labels, k=k, temperature=temperature,
                                 num_classes=num_classes, repeats=repeats, clock=clock)
    finally:
        if limits is not None:
            limits.restore_original_limits()


def _compare_backends(bank, bank_labels, queries, query_labels, *, k, temperature, num_classes,
                      repeats, clock) -> list[dict]:
    device = bank.device
    rows = []
    kw = dict(k=k, temperature=temperature, num_classes=num_classes)
    seconds, scores = timed(lambda: knn_predict(bank, bank_labels, queries, backend="torch", **kw),
                            device, repeats, clock)
    reference = scores.argmax(1).cpu().numpy()
    labels = query_labels.cpu().numpy()
    rows.append(dict(backend="torch", where=device.type, seconds=seconds, pred=reference))
    try:
        import faiss  # noqa: F401
        from trainer.knn import _faiss, _faiss_on_gpu
        where = "cuda" if bank.is_cuda and _faiss_on_gpu(_faiss()) else "cpu"
        if not bank.is_cuda:
            faiss.omp_set_num_threads(torch.get_num_threads())
        seconds, scores = timed(lambda: knn_predict(bank, bank_labels, queries, backend="faiss", **kw),
                                device, repeats, clock)
        rows.append(dict(backend=f"faiss {faiss.__version__}", where=where, seconds=seconds,
                         pred=scores.argmax(1).cpu().numpy()))
    except ImportError:
        rows.append(dict(backend="faiss", where="not installed", seconds=None, pred=None))
    try:
        import sklearn
        b, bl, q = bank.cpu().numpy(), bank_labels.cpu().numpy(), queries.cpu().numpy()
        seconds, scores = timed(lambda: sklearn_predict(b, bl, q, **kw), torch.device("cpu"),
                                max(1, repeats // 2), clock)
        rows.append(dict(backend=f"sklearn {sklearn.__version__}", where="cpu", seconds=seconds,
                         pred=scores.argmax(1)))
    except ImportError:
        rows.append(dict(backend="sklearn", where="not installed", seconds=None, pred=None))
    for row in rows:
        if row["pred"] is not None:
            row["top1"] = float(np.mean(row["pred"] == labels))
            row["agree"] = float(np.mean(row["pred"] == reference))
    return rows


def print_backends(rows, title: str) -> tuple[str, bool]:
    print(title)
    for r in rows:
        if r["seconds"] is None:
            print(f"  {r['backend']:16s} {r['where']}")
        else:
            print(f"  {r['backend']:16s} on {r['where']:4s} {r['seconds'] * 1e3:10.1f} ms   "
                  f"top-1 {r['top1']:.4f}   same prediction as torch: {r['agree']:.2%}")
    timed_rows = [r for r in rows if r["seconds"] is not None]
    agree = min(r["agree"] for r in timed_rows)
    text = ", ".join(f"{r['backend'].split()[0]} {r['seconds'] * 1e3:.0f} ms" for r in timed_rows)
    missing = [r["backend"] for r in rows if r["seconds"] is None]
    if missing:
        text += f" ({', '.join(missing)} not installed)"
    return f"{text}; agreement {agree:.2%}", agree >= 0.999


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--quick", action="store_true", help="narrowed model, small sizes (< 1 minute)")
    parser.add_argument("--val-size", type=int,
                        help="held-out queries per evaluation (default: 1,000 = the CPU sample's "
                             "held-out split for the tiny preset, else 5,000 = knn.val_size)")
    parser.add_argument("--queue", type=int,
                        help="queue entries (default: 500 = 0.1 x 5,000 sample images for the tiny "
                             "preset, else 128,116 = 0.1 x ImageNet)")
    parser.add_argument("--every", type=int, default=20, help="knn.every (default 20)")
    parser.add_argument("--steps", type=int, help="timed training steps (default 20, quick 4)")
    parser.add_argument("--repeats", type=int, help="timed evaluations (default 5, quick 2)")
    parser.add_argument("--compare", metavar="BANKxQUERIESxDIM",
                        help="also compare backends on random features of this size (default in "
                             "full CPU mode: 128116x5000x384, the ViT-S / ImageNet monitor; 'none' "
                             "to skip)")
    parser.add_argument("--goal", type=float, default=0.02, help="share goal (default 0.02)")
    args = parser.parse_args(argv)
    quick_model(args)
    tiny = args.model == "tiny"
    val_size = args.val_size or (200 if args.quick else 1000 if tiny else 5000)
    queue = args.queue or (500 if tiny else round(0.1 * IMAGENET_TRAIN))
    steps = args.steps or (4 if args.quick else 20)
    repeats = args.repeats or (2 if args.quick else 5)
    compare = args.compare or ("128116x5000x384" if args.device == "cpu" and not args.quick else "none")

    extra = {} if tiny else {"data.synthetic_classes": 1000}
    cfg = config_from_args(args, **extra)
    trainer = build_trainer(cfg)
    device = trainer.device
    clock = "wall" if device.type == "cuda" else "cpu"
    num_classes = trainer.data.num_classes
    trainer.knn = KnnMonitor(queue, trainer.model.feature_dim, num_classes, k=cfg.knn.k,
                             temperature=cfg.knn.temperature, backend=cfg.knn.backend, device=device)
    fill_queue(trainer.knn, num_classes, device)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(val_size, 3, cfg.model.img_size, cfg.model.img_size, generator=g)
    trainer.knn_queries = (images.to(device, torch.float16),
                           torch.randint(0, num_classes, (val_size,), generator=g).to(device))
    print(f"figure 2: kNN monitor -- {describe(cfg, device)}; queue {queue:,} x "
          f"{trainer.model.feature_dim}, {val_size:,} queries, {num_classes} classes, "
          f"k={cfg.knn.k}, backend={cfg.knn.backend}; {clock} time")
    print(f"machine: {machine()}")

    batch = fixed_batch(trainer)
    timed_steps(trainer, batch, 2)  # warm-up
    wall, cpu = timed_steps(trainer, batch, steps)
    t_step = statistics.median(cpu if clock == "cpu" else wall)
    t_eval, _ = timed(trainer.evaluate_queue_knn, device, repeats, clock)
    t_feat, feats = timed(lambda: trainer._embed(trainer.knn_queries[0].split(256)), device, repeats, clock)
    t_knn, _ = timed(lambda: trainer.knn.evaluate(feats, trainer.knn_queries[1]), device, repeats, clock)
    share = t_eval / (t_eval + args.every * t_step)
    b = cfg.optim.batch_size
    print(f"training step (instrumented): {t_step * 1e3:.1f} ms = {b / t_step:,.0f} images/s")
    print(f"one queue evaluation: {t_eval * 1e3:.1f} ms; its parts timed on their own: forward of "
          f"{val_size:,} images {t_feat * 1e3:.1f} ms, kNN vs {queue:,} entries {t_knn * 1e3:.1f} ms")
    print(f"share of training time at knn.every={args.every}: {share:.2%}"
          f"  (= {t_eval / t_step:.2f} training steps per evaluation)")
    for bigger in (1024, 4096):
        if bigger > b and not tiny:
            s = t_eval / (t_eval + args.every * t_step * bigger / b)
            print(f"  extrapolated to batch {bigger} (step time x {bigger / b:g}): {s:.2%}")
    result(f"2 queue kNN evaluation ({device.type}, {cfg.model.preset}, {val_size} queries, queue {queue})",
           f"{t_eval * 1e3:.0f} ms (alone: forward {t_feat * 1e3:.0f}, kNN {t_knn * 1e3:.0f})", "", "info")
    result(f"2 queue kNN share of training at every={args.every} ({device.type}, {cfg.model.preset}, b{b})",
           f"{share:.2%}", f"<= {args.goal:.0%}", verdict(None if args.quick else share <= args.goal))

    bank = trainer.knn.features[:trainer.knn.filled]
    bank_labels = trainer.knn.labels[:trainer.knn.filled]
    query_labels = trainer.knn_queries[1]
    rows = compare_backends(bank, bank_labels, feats, query_labels, k=cfg.knn.k,
                            temperature=cfg.knn.temperature, num_classes=num_classes,
                            repeats=repeats, clock=clock)
    text, ok = print_backends(rows, f"backends on the evaluation's own features "
                                    f"({len(bank):,} x {len(feats):,} x {bank.shape[1]}):")
    result(f"2 kNN backends, {len(bank)} bank x {len(feats)} queries x {bank.shape[1]} ({device.type})",
           text, "same predictions", verdict(ok))
    if compare != "none":
        n_bank, n_query, dim = (int(x) for x in compare.lower().split("x"))
        bank, bank_labels = class_features(n_bank, dim, 1000, seed=3, device=device)
        queries, query_labels = class_features(n_query, dim, 1000, seed=4, device=device)
        rows = compare_backends(bank, bank_labels, queries, query_labels, k=cfg.knn.k,
                                temperature=cfg.knn.temperature, num_classes=1000,
                                repeats=max(1, repeats // 2), clock=clock)
        text, ok = print_backends(rows, f"backends on random class-clustered features "
                                        f"({n_bank:,} x {n_query:,} x {dim}, 1000 classes):")
        result(f"2 kNN backends, {n_bank} bank x {n_query} queries x {dim} ({device.type})",
               text, "same predictions", verdict(ok))
    return 0


if __name__ == "__main__":
    sys.exit(main())
