"""Near-duplicate search: block-wise search equals brute force, faiss finds close pairs, clusters are
the connected components of the pairs."""

from __future__ import annotations

import numpy as np
import pytest

from dinokit.eval.duplicates import DuplicatePair, duplicate_clusters, search_pairs_exact, search_pairs_faiss


def _brute_pairs(q, d, t, self_search):
    out = set()
    for i in range(len(q)):
        for j in range(len(d)):
            if self_search and j <= i:
                continue
            s = float(np.dot(q[i], d[j]))
            if s >= t:
                out.add((i, j))
    return out


def test_blockwise_search_equals_brute_force():
    rng = np.random.default_rng(0)
    base = rng.normal(size=(6, 16))
    q = np.concatenate([base, base[:4] + 0.3 * rng.normal(size=(4, 16)), rng.normal(size=(7, 16))])
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    for block in (1, 3, 5, 100):
        a, b, s, truncated, best = search_pairs_exact(q, None, 0.6, block=block)
        assert set(zip(a.tolist(), b.tolist())) == _brute_pairs(q, q, 0.6, True)
        assert np.allclose(s, [q[i] @ q[j] for i, j in zip(a, b)], atol=1e-5)
        assert not truncated
        sim = q @ q.T
        np.fill_diagonal(sim, -np.inf)
        assert np.allclose(best, sim.max(1), atol=1e-5)
    d = q[3:12]
    same = np.array([i - 3 if 3 <= i < 12 else -1 for i in range(len(q))])
    a, b, s, _, _ = search_pairs_exact(q, d, 0.6, block=4, same=same)
    want = {(i, j) for i, j in _brute_pairs(q, d, 0.6, False) if same[i] != j}
    assert set(zip(a.tolist(), b.tolist())) == want
    # a cap keeps the best pairs
    a, b, s, truncated, _ = search_pairs_exact(q, None, -1.0, max_pairs=5, block=2)
    all_s = np.sort((q @ q.T)[np.triu_indices(len(q), 1)])[::-1]
    assert truncated and len(s) == 5 and np.allclose(s, all_s[:5], atol=1e-5)


def test_faiss_search_finds_close_pairs():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    base = rng.normal(size=(50, 32))
    q = np.concatenate([base, base[:5] + 0.05 * rng.normal(size=(5, 32))])
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    a, b, s, _, _ = search_pairs_faiss(q, None, 0.9, neighbours=4, block=16)
    assert set(zip(a.tolist(), b.tolist())) == _brute_pairs(q, q, 0.9, True)


def test_faiss_missing_is_one_sentence(monkeypatch):
    import sys

    from dinokit.errors import DinokitError

    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails
    q = np.eye(3, dtype=np.float32)
    with pytest.raises(DinokitError, match=r"needs the faiss package \(pip install faiss-cpu"):
        search_pairs_faiss(q, None, 0.9)


def test_clusters_are_the_connected_components_of_the_pairs():
    four = ["d", "a", "c", "b"]
    pairs = [
        DuplicatePair(x, y, 0.9 + 0.01 * k)
        for k, (x, y) in enumerate((x, y) for i, x in enumerate(four) for y in four[i + 1 :])
    ]  # all six pairs
    pairs += [DuplicatePair("y", "x", 0.99), DuplicatePair("p", "q", 0.95), DuplicatePair("q", "r", 0.91)]
    clusters = duplicate_clusters(pairs)
    assert [c.images for c in clusters] == [["a", "b", "c", "d"], ["p", "q", "r"], ["x", "y"]]
    assert [c.pairs for c in clusters] == [6, 2, 1]
    assert clusters[0].max_score == pytest.approx(0.95) and clusters[0].min_score == pytest.approx(0.90)
    assert clusters[1].min_score == pytest.approx(0.91)
    assert duplicate_clusters([]) == []
