"""The fingerprinted cache every embedding cache uses: a file is reused only while its fingerprint
and the stamps of its images match."""

from __future__ import annotations

import os

import torch

from dinokit.eval.cache import CachedTensors, file_stamp, files_key


def test_files_key_follows_the_fingerprint_the_extra_and_the_files(tmp_path):
    a = tmp_path / "a.png"
    a.write_bytes(b"one")
    key = files_key({"weights": "w"}, [a])
    assert files_key({"weights": "w"}, [a]) == key
    assert files_key({"weights": "v"}, [a]) != key
    assert files_key({"weights": "w"}, [a], extra="boxes") != key
    a.write_bytes(b"longer")
    assert files_key({"weights": "w"}, [a]) != key
    assert file_stamp(tmp_path / "missing.png") == (-1, -1)


def test_cached_tensors_round_trip_and_refuse_other_fingerprints(tmp_path):
    cache = CachedTensors(tmp_path / "sub" / "x.pt")
    assert not cache.exists() and cache.load({"k": 1}) is None
    cache.save({"fingerprint": {"k": 1}, "features": torch.arange(6.0).reshape(2, 3)})
    got = cache.load({"k": 1})
    assert got is not None and torch.equal(got["features"], torch.arange(6.0).reshape(2, 3))
    assert cache.load({"k": 2}) is None
    loose = CachedTensors(cache.path, matches=lambda stored, expected: stored["k"] == expected["k"])
    assert loose.load({"k": 1, "name": "ignored"}) is not None


def test_a_damaged_cache_file_counts_as_none(tmp_path):
    path = tmp_path / "x.pt"
    path.write_bytes(b"not a torch file")
    assert CachedTensors(path).load({}) is None
    os.remove(path)
