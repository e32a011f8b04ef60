"""kNN monitor: scikit-learn reference, faiss == torch, accuracy, FIFO queue, resume; the
representation columns (RankMe effective rank, std of normalised features) against numpy."""
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.knn import KnnMonitor, effective_rank, feature_std, knn_accuracy, knn_predict

T = 0.07


def clustered(n, classes=10, dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    labels = torch.randint(classes, (n,), generator=gen)
    return centers[labels] + 0.9 * torch.randn(n, dim, generator=gen), labels


def test_matches_sklearn_weighted_knn():
    from sklearn.neighbors import KNeighborsClassifier

    bank, bank_labels = clustered(400, seed=0)
    query, _ = clustered(150, seed=1)
    clf = KNeighborsClassifier(n_neighbors=20, metric="cosine", algorithm="brute",
                               weights=lambda dist: np.exp((1.0 - dist) / T))
    clf.fit(bank.double().numpy(), bank_labels.numpy())
    scores = knn_predict(bank, bank_labels, query, k=20, temperature=T, num_classes=10,
                         backend="torch")
    np.testing.assert_array_equal(scores.argmax(1).numpy(), clf.predict(query.double().numpy()))
    proba = (scores / scores.sum(1, keepdim=True)).numpy()
    np.testing.assert_allclose(proba, clf.predict_proba(query.double().numpy()), atol=1e-5)


def test_torch_chunking_and_faiss_agree():
    bank, bank_labels = clustered(500, seed=2)
    query, _ = clustered(120, seed=3)
    kwargs = dict(k=20, temperature=T, num_classes=10)
    ref = knn_predict(bank, bank_labels, query, backend="torch", **kwargs)
    chunked = knn_predict(bank, bank_labels, query, backend="torch", chunk_size=7, **kwargs)
    torch.testing.assert_close(chunked, ref)
    pytest.importorskip("faiss")
    faiss_scores = knn_predict(bank, bank_labels, query, backend="faiss", **kwargs)
    np.testing.assert_array_equal(faiss_scores.argmax(1).numpy(), ref.argmax(1).numpy())
    torch.testing.assert_close(faiss_scores, ref, rtol=1e-4, atol=1e-3)


def test_faiss_missing_is_a_one_line_import_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # makes `import faiss` fail
    bank, labels = clustered(30)
    with pytest.raises(ImportError, match=r"pip install stabilitylab\[faiss\]"):
        knn_predict(bank, labels, bank, num_classes=10, backend="faiss")
    auto = knn_predict(bank, labels, bank, num_classes=10, backend="auto")  # falls back to torch
    torch.testing.assert_close(auto, knn_predict(bank, labels, bank, num_classes=10,
                                                 backend="torch"))


def test_k_larger_than_bank():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scores = knn_predict(bank, torch.tensor([0, 1]), torch.tensor([[2.0, 0.0]]), k=20,
                         temperature=0.5, num_classes=3, backend="torch")
    torch.testing.assert_close(scores, torch.tensor([[np.exp(2.0), 1.0, 0.0]]).float())


def test_accuracy_hand_made():
    scores = torch.tensor([
        [9.0, 8, 7, 6, 5, 4, 0],  # label 0: top1 and top5
        [9.0, 8, 7, 6, 5, 4, 0],  # label 4: top5 only
        [9.0, 8, 7, 6, 5, 4, 0],  # label 5: neither
        [9.0, 0, 0, 0, 0, 0, 0],  # label 3: in the top 5 only by a tie at 0 -> no hit
    ])
    assert knn_accuracy(scores, torch.tensor([0, 4, 5, 3])) == (0.25, 0.5)
    few = torch.tensor([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])  # 3 classes
    assert knn_accuracy(few, torch.tensor([0, 1, 2])) == pytest.approx((1 / 3, 2 / 3))


def test_queue_fifo_wraparound_and_big_batch():
    monitor = KnnMonitor(queue_size=5, feature_dim=2, num_classes=8)
    assert monitor.evaluate(torch.ones(1, 2), torch.zeros(1, dtype=torch.long)) is None
    def feats(labels):  # distinct directions, so normalisation keeps them apart
        return torch.stack([torch.tensor(labels).float() + 1, torch.ones(len(labels))], 1)

    monitor.enqueue(feats([0, 1, 2]), torch.tensor([0, 1, 2]))
    assert (monitor.filled, monitor.ptr) == (3, 3)
    result = monitor.evaluate(torch.tensor([[1.0, 1.0]]), torch.tensor([0]))
    assert result["bank_size"] == 3 and result["k"] == 3 and result["n_queries"] == 1
    monitor.enqueue(feats([3, 4, 5, 6]), torch.tensor([3, 4, 5, 6]))
    assert monitor.labels.tolist() == [5, 6, 2, 3, 4] and (monitor.filled, monitor.ptr) == (5, 2)
    torch.testing.assert_close(monitor.features, F.normalize(feats([5, 6, 2, 3, 4]), dim=1))
    monitor.enqueue(feats(list(range(7))), torch.arange(7))  # larger than the queue: newest 5
    assert sorted(monitor.labels.tolist()) == [2, 3, 4, 5, 6] and monitor.ptr == 2
    assert monitor.labels.tolist() == [5, 6, 2, 3, 4]


def test_state_dict_round_trip():
    bank, labels = clustered(90, seed=4)
    query, query_labels = clustered(40, seed=5)
    monitor = KnnMonitor(queue_size=64, feature_dim=16, num_classes=10, k=5, backend="torch")
    monitor.enqueue(bank[:50], labels[:50])
    resumed = KnnMonitor(queue_size=64, feature_dim=16, num_classes=10, k=5, backend="torch")
    resumed.load_state_dict(monitor.state_dict())
    for m in (monitor, resumed):
        m.enqueue(bank[50:], labels[50:])  # wraps around
    assert resumed.evaluate(query, query_labels) == monitor.evaluate(query, query_labels)
    torch.testing.assert_close(resumed.features, monitor.features, rtol=0, atol=0)
    with pytest.raises(ValueError, match="shape"):
        KnnMonitor(queue_size=32, feature_dim=16, num_classes=10).load_state_dict(
            monitor.state_dict())


def test_effective_rank_and_feature_std_against_numpy():
    gen = torch.Generator().manual_seed(0)
    spread = torch.randn(500, 16, generator=gen)
    collapsed = torch.randn(1, 16, generator=gen) + 1e-4 * spread  # every feature at one point
    for features in (spread, collapsed):
        x = features.double().numpy()
        s = np.linalg.svd(x, compute_uv=False)
        p = s / s.sum() + 1e-7
        assert effective_rank(features) == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-5)
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        assert feature_std(features) == pytest.approx(unit.std(axis=0, ddof=1).mean(), rel=1e-5)
    assert effective_rank(spread) > 14 and effective_rank(collapsed) < 1.1  # RankMe: 16 vs 1 direction
    assert feature_std(spread) == pytest.approx(16 ** -0.5, rel=0.1) and feature_std(collapsed) < 1e-3
