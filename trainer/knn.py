"""Dense kNN monitor: weighted kNN accuracy (Wu et al. 2018) of features against a feature bank.

MoCo v3 (appendix A) tracks a kNN accuracy during training; here the bank is a FIFO queue of
training features (`KnnMonitor`) or the whole training split. See docs/knn_monitor.md.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

_SIMILARITY_ELEMENTS = 2**27  # torch backend: query chunk x bank similarity block (512 MB fp32)


def _faiss():
    """The faiss module (with torch-tensor support), or None when it is not installed."""
    try:
        import faiss
        import faiss.contrib.torch_utils  # noqa: F401  (lets faiss indexes take torch tensors)
    except ImportError:
        return None
    return faiss


def _faiss_on_gpu(faiss) -> bool:
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@functools.cache
def _gpu_resources():
    return _faiss().StandardGpuResources()  # one per process: it owns scratch GPU memory


def _faiss_search(bank: torch.Tensor, query: torch.Tensor, k: int):
    faiss = _faiss()
    if faiss is None:
        raise ImportError("backend='faiss' needs faiss: pip install stabilitylab[faiss]")
    if bank.is_cuda and _faiss_on_gpu(faiss):
        config = faiss.GpuIndexFlatConfig()
        config.device = bank.device.index if bank.device.index is not None else 0
        index = faiss.GpuIndexFlatIP(_gpu_resources(), bank.shape[1], config)
    else:
        index = faiss.IndexFlatIP(bank.shape[1])
        bank, query = bank.cpu(), query.cpu()
    index.add(bank.contiguous())
    return index.search(query.contiguous(), k)


def _torch_search(bank: torch.Tensor, query: torch.Tensor, k: int, chunk_size: int | None):
    chunk_size = chunk_size or max(1, _SIMILARITY_ELEMENTS // len(bank))
    results = [(chunk @ bank.T).topk(k, dim=1) for chunk in query.split(chunk_size)]
    return torch.cat([r.values for r in results]), torch.cat([r.indices for r in results])


def knn_predict(bank_features: torch.Tensor, bank_labels: torch.Tensor,
                query_features: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                num_classes: int, backend: str = "auto",
                chunk_size: int | None = None) -> torch.Tensor:
    """Weighted-kNN class scores (n_queries, num_classes) on the query's device.

    Cosine similarity; each of the k nearest bank entries votes for its label with weight
    exp(sim / temperature). Backends: `torch` (chunked matmul + topk; chunk_size queries per
    block, default: a ~512 MB similarity block), `faiss` (exact IndexFlatIP, on the GPU when
    faiss has GPU support and the tensors are on cuda), `auto`: faiss when it is installed
    and can run where the tensors are (CPU tensors, or GPU faiss), else torch.
    """
    if backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"backend={backend!r} is not one of auto, faiss, torch")
    if backend == "auto":
        faiss = _faiss()
        usable = faiss is not None and (not bank_features.is_cuda or _faiss_on_gpu(faiss))
        backend = "faiss" if usable else "torch"
    device = query_features.device
    bank = F.normalize(bank_features.float(), dim=1)
    query = F.normalize(query_features.float().to(bank.device), dim=1)
    k = min(k, len(bank))
    if backend == "faiss":
        sims, indices = _faiss_search(bank, query, k)
    else:
        sims, indices = _torch_search(bank, query, k, chunk_size)
    sims, indices = sims.to(device), indices.to(device)
    weights = (sims / temperature).exp()
    scores = torch.zeros(len(query), num_classes, device=device)
    return scores.scatter_add_(1, bank_labels.to(device)[indices], weights)


def knn_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(top1, top5) in 0-1 from class scores.

    A query counts as a top-j hit when its label is among the j highest scores and has a
    positive score, i.e. at least one neighbour carries it. So a label that merely fills a
    top-5 slot by tie with zero-score classes is no hit, and with fewer than 5 classes top5
    is the fraction of queries whose label occurs among their neighbours (not a trivial 1.0).
    """
    labels = labels.to(scores.device)
    ranked = scores.topk(min(5, scores.shape[1]), dim=1).indices
    voted = scores.gather(1, labels[:, None]).squeeze(1) > 0
    top1 = (ranked[:, 0] == labels) & voted
    top5 = (ranked == labels[:, None]).any(dim=1) & voted
    return top1.float().mean().item(), top5.float().mean().item()


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe (Garrido et al. 2023) of an (n, d) feature matrix: exp of the entropy of its
    singular values normalised to sum 1 (plus `eps`, as in the paper); from 1 (collapsed to a
    line) to min(n, d) (all directions used equally)."""
    singular = torch.linalg.svdvals(features.float())
    p = singular / singular.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_std(features: torch.Tensor) -> float:
    """Std over samples of the L2-normalised features, averaged over dimensions (SimSiam's
    collapse check): about 1/sqrt(d) when the features spread over the sphere, 0 when collapsed."""
    return float(F.normalize(features.float(), dim=1).std(dim=0).mean())


def feature_stats(features: torch.Tensor) -> dict:
    """The representation columns of a `knn` row: effective_rank and feature_std."""
    return {"effective_rank": effective_rank(features), "feature_std": feature_std(features)}


class KnnMonitor:
    """FIFO queue of L2-normalised training features + labels on the device, for kNN accuracy.

    The queue fills from index 0 and then wraps around, so its filled entries are always
    the first `filled` rows. `state_dict` holds the queue itself: a resumed run evaluates
    against exactly the same bank.
    """

    def __init__(self, queue_size: int, feature_dim: int, num_classes: int, *, k: int = 20,
                 temperature: float = 0.07, backend: str = "auto",
                 device: torch.device | str = "cpu"):
        self.num_classes, self.k, self.temperature = num_classes, k, temperature
        self.backend = backend
        self.features = torch.zeros(queue_size, feature_dim, device=device)
        self.labels = torch.full((queue_size,), -1, dtype=torch.long, device=device)
        self.ptr = 0  # next row to write
        self.filled = 0

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add a batch, overwriting the oldest entries; of a batch larger than the queue only
        the newest queue_size rows are kept."""
        size = len(self.features)
        features, labels = features[-size:], labels[-size:]
        rows = (self.ptr + torch.arange(len(features), device=self.features.device)) % size
        self.features[rows] = F.normalize(features.detach().float(), dim=1).to(self.features.device)
        self.labels[rows] = labels.to(self.labels.device, torch.long)
        self.ptr = (self.ptr + len(features)) % size
        self.filled = min(self.filled + len(features), size)

    @torch.no_grad()
    def evaluate(self, query_features: torch.Tensor, query_labels: torch.Tensor) -> dict | None:
        """dict(top1, top5, bank_size, n_queries, k) against the filled queue; None if empty.

        `k` is the number of neighbours actually used: min(k, bank_size).
        """
        if self.filled == 0:
            return None
        scores = knn_predict(self.features[:self.filled], self.labels[:self.filled],
                             query_features, k=self.k, temperature=self.temperature,
                             num_classes=self.num_classes, backend=self.backend)
        top1, top5 = knn_accuracy(scores, query_labels)
        return dict(top1=top1, top5=top5, bank_size=self.filled, n_queries=len(query_features),
                    k=min(self.k, self.filled))

    def state_dict(self) -> dict:
        return dict(features=self.features.cpu(), labels=self.labels.cpu(), ptr=self.ptr,
                    filled=self.filled)

    def load_state_dict(self, state: dict) -> None:
        if state["features"].shape != self.features.shape:
            raise ValueError(f"kNN queue shape {tuple(state['features'].shape)} in the checkpoint "
                             f"!= configured {tuple(self.features.shape)}")
        self.features.copy_(state["features"])
        self.labels.copy_(state["labels"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
