"""The weighted k-NN against a brute-force formulation of the paper's protocol, and its memory use."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import pytest
import torch

from dinokit.errors import DataError
from dinokit.eval.knn import knn_classify, knn_predict


def brute_force_knn(train, train_labels, test, test_labels, ks, T=0.07, num_classes=None):
    """One query at a time: cosine similarities, a full stable sort, exp(sim/T) votes per class.
    Equal votes rank the lower class index first; top-5 with fewer classes is top-C."""
    train = [[float(v) for v in row] for row in train.double()]
    test = [[float(v) for v in row] for row in test.double()]
    C = num_classes or max(max(train_labels.tolist()), max(test_labels.tolist())) + 1

    def unit(v):
        n = math.sqrt(sum(x * x for x in v))
        return [x / n for x in v]

    train = [unit(v) for v in train]
    out = {}
    for k in ks:
        kk = min(k, len(train))
        top1 = top5 = 0
        for q, y in zip(test, test_labels.tolist()):
            q = unit(q)
            sims = [sum(a * b for a, b in zip(q, t)) for t in train]
            order = sorted(range(len(train)), key=lambda i: -sims[i])
            votes = [0.0] * C
            for i in order[:kk]:
                votes[int(train_labels[i])] += math.exp(sims[i] / T)
            ranking = sorted(range(C), key=lambda c: (-votes[c], c))
            top1 += ranking[0] == y
            top5 += y in ranking[:5]
        out[k] = (100.0 * top1 / len(test), 100.0 * top5 / len(test))
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k][0] == pytest.approx(b[k][0], abs=1e-9), (k, a[k], b[k])
        assert a[k][1] == pytest.approx(b[k][1], abs=1e-9), (k, a[k], b[k])


def test_matches_brute_force_several_k_and_classes():
    g = torch.Generator().manual_seed(0)
    C, D = 7, 16
    centers = torch.randn(C, D, generator=g)
    train_labels = torch.randint(0, C, (120,), generator=g)
    test_labels = torch.randint(0, C, (37,), generator=g)
    train = centers[train_labels] + 2.0 * torch.randn(120, D, generator=g)
    test = centers[test_labels] + 2.0 * torch.randn(37, D, generator=g)
    ks = (1, 3, 10, 20, 100)
    got = knn_classify(train, train_labels, test, test_labels, ks=ks, temperature=0.07)
    want = brute_force_knn(train, train_labels, test, test_labels, ks)
    assert_same(got, want)
    # the accuracies are neither all 0 nor all 100: the comparison means something
    assert 0 < got[10][0] < 100
    # a tiny memory budget (one query per chunk) gives the same answer
    assert_same(knn_classify(train, train_labels, test, test_labels, ks=ks, memory_budget=1), got)


def test_ties_k_larger_than_a_class_and_one_test_image():
    # two identical training points of different classes: their votes tie exactly, the lower class wins
    train = torch.tensor(
        [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.9, 0.1]]
    )
    train_labels = torch.tensor([2, 1, 0, 3, 0])
    test = torch.tensor([[1.0, 0.1, 0.0]])
    for y in range(4):
        test_labels = torch.tensor([y])
        ks = (2, 3, 4, 5)  # k = 2 holds the tie; k > size of class 1, 2 and 3
        got = knn_classify(train, train_labels, test, test_labels, ks=ks)
        want = brute_force_knn(train, train_labels, test, test_labels, ks)
        assert_same(got, want)
    # the tie at k = 2 goes to class 1 (lower index than 2)
    assert knn_classify(train, train_labels, test, torch.tensor([1]), ks=(2,))[2][0] == 100.0
    # duplicated training rows of one class tie in similarity; which one is taken does not matter
    train2 = torch.cat([train, train[:1], train[:1]])
    labels2 = torch.cat([train_labels, torch.tensor([2, 2])])
    got = knn_classify(train2, labels2, test, torch.tensor([2]), ks=(4, 7))
    assert_same(got, brute_force_knn(train2, labels2, test, torch.tensor([2]), (4, 7)))


def test_fewer_than_five_classes_and_k_beyond_training_set(caplog):
    g = torch.Generator().manual_seed(1)
    train = torch.randn(6, 4, generator=g)
    train_labels = torch.tensor([0, 0, 1, 1, 2, 2])
    test = torch.randn(3, 4, generator=g)
    test_labels = torch.tensor([0, 1, 2])
    with caplog.at_level("WARNING", logger="dinokit"):  # conftest keeps the logger propagating
        got = knn_classify(train, train_labels, test, test_labels, ks=(2, 200))
    assert "larger than the training set" in caplog.text
    assert set(got) == {2, 200}
    # with 3 classes "top-5" is top-3: every true class is among them
    assert got[200][1] == 100.0 and got[2][1] == 100.0
    assert_same(got, brute_force_knn(train, train_labels, test, test_labels, (2, 200)))
    # num_classes beyond the labels seen: zero-vote classes rank after voted ones, by index
    got = knn_classify(train, train_labels, test, test_labels, ks=(6,), num_classes=10)
    assert_same(got, brute_force_knn(train, train_labels, test, test_labels, (6,), num_classes=10))


def test_bad_input_is_one_sentence():
    with pytest.raises(DataError, match="384-d but the test features are 192-d"):
        knn_classify(torch.randn(5, 384), torch.zeros(5), torch.randn(2, 192), torch.zeros(2))
    with pytest.raises(DataError, match="training set is empty"):
        knn_classify(torch.randn(0, 8), torch.zeros(0), torch.randn(2, 8), torch.zeros(2))
    with pytest.raises(DataError, match="k must be a positive"):
        knn_predict(torch.randn(5, 8), torch.zeros(5), torch.randn(2, 8), ks=(0,))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, sys, torch
    from dinokit.eval.knn import knn_classify
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50_000, 384, generator=g)
    labels = torch.randint(0, 1000, (50_000,), generator=g)
    test = torch.randn(10_000, 384, generator=g)
    test_labels = torch.randint(0, 1000, (10_000,), generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    res = knn_classify(train, labels, test, test_labels, ks=(10, 20, 100, 200), num_classes=1000)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, res[20][0])
    """
)


@pytest.mark.slow
def test_memory_of_a_50k_bank_with_10k_queries_stays_under_2gb():
    """Peak resident memory above the inputs, measured in a fresh process (ru_maxrss, in KiB on Linux)."""
    if sys.platform != "linux":
        pytest.skip("ru_maxrss units differ off Linux")
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    extra_bytes, top1 = out.stdout.split()
    extra = int(extra_bytes)
    assert extra < 2 * 2**30, f"k-NN used {extra / 2**30:.2f} GiB above its inputs"
    assert 0.0 <= float(top1) < 1.0  # random labels: chance is 0.1 %
