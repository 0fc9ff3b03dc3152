"""``dinokit similar`` end to end: a folder ranked against query images, an exact copy first, the
query's own file never its match, the results as CSV and JSON and a contact sheet."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from PIL import Image

from tests.helpers import run_cli, smooth_photo


def test_similar_ranks_an_exact_copy_first(tmp_path, tiny2_weights):
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    for i in range(1, 7):
        smooth_photo(i).save(folder / f"other_{i}.png")
    query = tmp_path / "query.png"
    smooth_photo(0).save(query)
    shutil.copy(query, folder / "sub" / "zz_copy.png")  # byte for byte the query, under another name
    second = folder / "other_3.png"  # a query that is itself in the folder
    out = tmp_path / "out"
    r = run_cli(
        [
            "similar",
            query,
            second,
            "--against",
            folder,
            "--k",
            3,
            "--weights",
            tiny2_weights,
            "--image-size",
            64,
            "--device",
            "cpu",
            "--output",
            out,
            "--quiet",
        ]
    )
    assert r.exit_code == 0, r.output
    with open(out / "similar.csv") as f:
        rows = list(csv.DictReader(f))
    by_query: dict[str, list[dict]] = {}
    for row in rows:
        by_query.setdefault(row["query"], []).append(row)
    assert set(by_query) == {str(query), str(second)}
    first = by_query[str(query)]
    assert [int(x["rank"]) for x in first] == [1, 2, 3]
    assert first[0]["image"] == str(folder / "sub" / "zz_copy.png")
    assert abs(float(first[0]["score"]) - 1.0) < 1e-4  # the same pixels: cosine 1
    scores = [float(x["score"]) for x in first]
    assert scores == sorted(scores, reverse=True) and scores[1] < 0.9999
    # a query's own file is never its own match; the other images of the folder are
    mine = [x["image"] for x in by_query[str(second)]]
    assert str(second) not in mine and len(mine) == 3
    data = json.loads((out / "similar.json").read_text())
    assert data["n_queries"] == 2 and data["n_against"] == 7 and data["k"] == 3
    assert data["queries"][0]["matches"][0]["image"] == str(folder / "sub" / "zz_copy.png")
    sheet = np.asarray(Image.open(out / "similar.png"))
    assert sheet.shape[0] > 2 * 128 and sheet.shape[1] > 4 * 128  # two rows: the query and its 3 matches
    assert json.loads((out / "metrics.json").read_text())["n_against"] == 7
    # a second run reuses every stored descriptor
    r = run_cli(
        [
            "similar",
            query,
            "--against",
            folder,
            "--weights",
            tiny2_weights,
            "--image-size",
            64,
            "--device",
            "cpu",
            "--output",
            out,
            "--overwrite",
        ]
    )
    assert r.exit_code == 0, r.output
    assert "embedded 0 new images" in " ".join(r.output.split())


def test_similar_bad_input_is_one_sentence(tmp_path, tiny2_weights):
    smooth_photo(0).save(tmp_path / "q.png")
    r = run_cli(
        [
            "similar",
            tmp_path / "q.png",
            "--against",
            tmp_path / "missing",
            "--weights",
            tiny2_weights,
            "--output",
            tmp_path / "o",
        ]
    )
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split()), r.output
    r = run_cli(
        [
            "similar",
            tmp_path / "nope.png",
            "--against",
            tmp_path,
            "--weights",
            tiny2_weights,
            "--output",
            tmp_path / "o2",
        ]
    )
    assert r.exit_code == 2 and "does not exist" in " ".join(r.output.split()), r.output


def test_one_query_is_one_query(tmp_path, tiny2_weights):
    """The closing line counts in the right number: "1 query against 3 images"."""
    from tests.helpers import make_image

    for i in range(3):
        make_image(tmp_path / "folder" / f"{i}.png", seed=i)
    make_image(tmp_path / "q.png", seed=7)
    r = run_cli(["similar", tmp_path / "q.png", "--against", tmp_path / "folder", "--weights", tiny2_weights,
                 "--image-size", "32", "--output", tmp_path / "out", "--quiet"])  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "1 query against 3 images; embedded 4 new images" in r.text, r.text
