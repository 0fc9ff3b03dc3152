"""The embedding store round-trips in chunks, unreadable files marked."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

import dinokit
from dinokit.eval.store import EmbeddingStore, embed_into_store
from tests.helpers import smooth_photo


def test_store_round_trip_in_chunks(tmp_path):
    from dinokit.eval.descriptors import (
        DescriptorEmbedder,
        copy_feature_fn,
        copy_transform,
    )

    paths = []
    for i in range(5):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        smooth_photo(i, 32).save(p)
        paths.append(p)
    (tmp_path / "imgs" / "bad.png").write_bytes(b"nope")
    paths.append(tmp_path / "imgs" / "bad.png")
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=1).eval()
    emb = DescriptorEmbedder(
        model, "random", copy_transform(32), copy_feature_fn(), "cls+gem", torch.device("cpu")
    )
    store = EmbeddingStore(tmp_path / "index", emb.fingerprint)
    assert embed_into_store(store, paths, emb, chunk_size=2) == 6
    assert len(list((tmp_path / "index").glob("emb-*.npy"))) == 3
    assert store.readable(paths) == [True] * 5 + [False]
    again = EmbeddingStore(tmp_path / "index", emb.fingerprint)
    assert again.missing(paths) == []
    got = again.read(paths[:5][::-1])
    from dinokit.eval.descriptors import copy_descriptor

    with torch.no_grad():
        x = torch.stack([copy_transform(32)(Image.open(p).convert("RGB")) for p in paths[:5][::-1]])
        want = copy_descriptor(model, x).numpy()
    assert np.allclose(got, want, atol=1e-5)


def _paths(tmp_path, n):
    out = []
    for i in range(n):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        smooth_photo(i, 32).save(p)
        out.append(p)
    return out


def test_two_writers_of_one_store_keep_each_other_s_chunks(tmp_path):
    """Two runs adding to one shared store at once: each chunk has a name of its own, so neither
    overwrites the other's rows and a later reader finds them all."""
    paths = _paths(tmp_path, 4)
    fp = {"descriptor": "test"}
    first, second = EmbeddingStore(tmp_path / "s", fp), EmbeddingStore(tmp_path / "s", fp)
    rows = np.arange(16, dtype=np.float32).reshape(4, 4)
    first.add(paths[:2], rows[:2], np.array([True, True]))
    second.add(paths[2:], rows[2:], np.array([True, False]))  # it has not seen the first's chunk yet
    assert len(list((tmp_path / "s").glob("emb-*.npy"))) == 2
    reader = EmbeddingStore(tmp_path / "s", fp)
    assert reader.missing(paths) == []
    assert reader.readable(paths) == [True, True, True, False]
    np.testing.assert_array_equal(reader.read(paths[:3]), rows[:3])


def test_a_store_of_the_earlier_chunk_names_is_read(tmp_path):
    from dinokit.eval.cache import file_stamp
    from dinokit.eval.store import INDEX_FORMAT
    from dinokit.io import write_json

    paths = _paths(tmp_path, 2)
    folder = tmp_path / "old"
    folder.mkdir()
    fp = {"descriptor": "test"}
    write_json(folder / "manifest.json", {"format": INDEX_FORMAT, "fingerprint": fp, "dim": 3})
    np.save(folder / "emb-00000.npy", np.ones((2, 3), np.float32))
    write_json(
        folder / "emb-00000.json", [[EmbeddingStore.key(p), *file_stamp(p), i] for i, p in enumerate(paths)]
    )
    store = EmbeddingStore(folder, fp)
    assert store.missing(paths) == []
    np.testing.assert_array_equal(store.read(paths), np.ones((2, 3)))
    store.add([tmp_path / "imgs" / "0.png"], np.zeros((1, 3), np.float32), np.array([True]))
    assert sorted(p.name for p in folder.glob("emb-*.npy"))[1].startswith("emb-00001-")
    np.testing.assert_array_equal(EmbeddingStore(folder, fp).read(paths[:1]), np.zeros((1, 3)))


def test_store_for_one_folder_per_fingerprint(tmp_path):
    from dinokit.eval.store import store_for

    a = store_for({"weights": "x", "image_size": 64}, tmp_path)
    b = store_for({"image_size": 64, "weights": "x"}, tmp_path)
    c = store_for({"weights": "x", "image_size": 48}, tmp_path)
    assert a.folder == b.folder != c.folder and a.folder.parent == tmp_path
