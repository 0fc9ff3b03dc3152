"""Revisited Oxford/Paris retrieval: AP and mP@k against the junk-shifting formulation and a
hand-worked ranking, and safe reading of the ground-truth pickle."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dinokit.errors import DataError
from dinokit.eval.metrics import trapezoid_ap
from dinokit.eval.retrieval import (
    load_revisited_ground_truth,
    parse_ground_truth,
    query_scores,
    revisited_map,
    safe_unpickle,
    thumbnail,
)
from tests.helpers import oxford_ground_truth, shifted_retrieval_scores


# ---------------------------------------------------------------------------------------------
# scores
# ---------------------------------------------------------------------------------------------
def test_scores_equal_the_junk_shifting_formulation():
    rng = np.random.default_rng(0)
    for _ in range(40):
        n = 30
        ranking = rng.permutation(n).tolist()
        ids = rng.permutation(n)
        positives = ids[: rng.integers(1, 6)].tolist()
        junk = ids[6 : 6 + rng.integers(0, 6)].tolist()
        ap, prs = query_scores(ranking, positives, junk)
        ap2, prs2 = shifted_retrieval_scores(ranking, positives, junk)
        assert ap == pytest.approx(ap2)
        assert prs == pytest.approx(prs2)


def test_ranking_worked_by_hand():
    # ranking 5, 2, 0, 3, 1, 4 with positives {0, 1} and junk {2}: without the junk the list is
    # 5, 0, 3, 1, 4 and the positives sit at ranks 1 and 3 (0-based)
    ap, prs = query_scores([5, 2, 0, 3, 1, 4], [0, 1], [2])
    assert ap == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)  # = 1/3
    # the last positive is 4th: P@1 = 0/1, P@5 = P@10 = 2/4
    assert prs == pytest.approx([0.0, 0.5, 0.5])
    # a perfect ranking of 2 positives scores 1 everywhere (precision at min(k, last positive))
    assert query_scores([1, 0, 2, 3], [0, 1], []) == (pytest.approx(1.0), pytest.approx([1.0, 1.0, 1.0]))
    assert trapezoid_ap([], 3) == 0.0
    # means over queries; a query without positives is left out
    m, mp, per = revisited_map(
        [[5, 2, 0, 3, 1, 4], [1, 0, 2, 3], [0, 1]], [[0, 1], [0, 1], []], [[2], [], []]
    )
    assert m == pytest.approx((1 / 3 + 1) / 2)
    assert mp == pytest.approx([0.5, 0.75, 0.75])
    assert np.isnan(per[2])


def test_protocols():
    gt = parse_ground_truth(oxford_ground_truth())
    pos, ign = gt.protocol("medium")
    assert pos == [[0, 1, 2], [4, 5, 6]] and ign == [[3], []]
    pos, ign = gt.protocol("hard")
    assert pos == [[2], [5, 6]] and ign == [[3, 0, 1], [4]]


# ---------------------------------------------------------------------------------------------
# the ground-truth pickle
# ---------------------------------------------------------------------------------------------
class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/dinokit_pwned_marker",))


def test_pickle_is_read_safely(tmp_path):
    gt = parse_ground_truth(safe_unpickle(pickle.dumps(oxford_ground_truth(), protocol=2)))
    assert gt.hard[1] == [5, 6] and gt.bbx[1] == (0.0, 0.0, 64.0, 48.0)
    marker = Path("/tmp/dinokit_pwned_marker")
    marker.unlink(missing_ok=True)
    bad = tmp_path / "gnd_roxford5k.pkl"
    bad.write_bytes(pickle.dumps({"imlist": [], "qimlist": [], "gnd": [_Evil()]}))
    with pytest.raises(DataError, match="refuses to unpickle"):
        load_revisited_ground_truth(bad)
    assert not marker.exists()
    bad.write_bytes(b"\x80\x04garbage")
    with pytest.raises(DataError, match="not a readable"):
        load_revisited_ground_truth(bad)


@pytest.mark.parametrize(
    "mutate, words",
    [
        (lambda g: [1, 2, 3], "holds a list"),
        (lambda g: {k: v for k, v in g.items() if k != "gnd"}, "no gnd"),
        (lambda g: {**g, "gnd": g["gnd"][:1]}, "1 entries for 2 queries"),
        (
            lambda g: {**g, "gnd": [{**g["gnd"][0], "hard": "x"}, g["gnd"][1]]},
            "is not a list of image indices",
        ),
        (
            lambda g: {**g, "gnd": [{**g["gnd"][0], "easy": [99]}, g["gnd"][1]]},
            "outside the 8 database images",
        ),
        (lambda g: {**g, "gnd": [{**g["gnd"][0], "bbx": [1, 2]}, g["gnd"][1]]}, "not four numbers"),
    ],
)
def test_wrong_shape_is_one_sentence(mutate, words):
    with pytest.raises(DataError) as e:
        parse_ground_truth(mutate(oxford_ground_truth()), "gnd.pkl")
    msg = str(e.value)
    assert words in msg and msg.count(". ") == 0 and msg.endswith(").")


def test_thumbnail_keeps_aspect_and_never_enlarges():
    assert thumbnail(Image.new("RGB", (400, 100)), 224).size == (224, 56)
    assert thumbnail(Image.new("RGB", (100, 50)), 224).size == (100, 50)
