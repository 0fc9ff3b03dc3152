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
    emb = DescriptorEmbedder(model, "random", copy_transform(32), copy_feature_fn(), "cls+gem", torch.device("cpu"))
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
