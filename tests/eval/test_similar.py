"""Similar images: the block-wise top k equals a full sort."""

from __future__ import annotations

import numpy as np
import torch

from dinokit.eval.similar import top_k_similar


def test_top_k_similar_matches_a_full_sort():
    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(7, 5, generator=g), dim=1).numpy()
    d = torch.nn.functional.normalize(torch.randn(23, 5, generator=g), dim=1).numpy()
    d[4] = d[9]  # a tie: the earlier row ranks first
    same = np.full(7, -1)
    same[2] = 11  # query 2's own file is database row 11
    s, i = top_k_similar(q, d, 4, block=5, same=same)
    full = q.astype(np.float64) @ d.T.astype(np.float64)
    full[2, 11] = -np.inf
    for r in range(7):
        want = sorted(range(23), key=lambda j: (-full[r, j], j))[:4]
        assert i[r].tolist() == want
        np.testing.assert_allclose(s[r], full[r, want], atol=1e-5)
    s, i = top_k_similar(q[:1], d[:2], 5)
    assert s.shape == (1, 2)
