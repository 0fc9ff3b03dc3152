"""Label propagation against a brute-force formulation written here (dense affinity, explicit window
mask, joint top-k, soft labels in the queue), the output step, frame resizing, and peak memory."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dinokit.data import davis
from dinokit.eval.propagation import LabelPropagator, PropagationConfig, joint_topk, soft_labels_to_mask


def brute_force(feats, labels0, n_last, radius, k, temperature, cosines=None):
    """The reference's algorithm, spelled out: (F, hw, hw) affinity, a window mask made with loops,
    top-k over all context patches of all frames at once, soft labels in a FIFO queue.
    ``cosines(t, context frames)`` replaces the float32 cosines."""
    T, h, w, D = feats.shape
    flat = F.normalize(feats.reshape(T, h * w, D), dim=-1)
    mask = torch.zeros(h * w, h * w)
    for i in range(h):
        for j in range(w):
            for a in range(h):
                for b in range(w):
                    if radius == 0 or (abs(a - i) <= radius and abs(b - j) <= radius):
                        mask[i * w + j, a * w + b] = 1
    queue = []  # (frame index, soft labels (C, hw))
    C = labels0.shape[0]
    first = labels0.reshape(C, -1)
    outs = []
    for t in range(1, T):
        ctx = [0] + [q[0] for q in queue]
        segs = [first] + [q[1] for q in queue]
        cos = flat[t] @ flat[ctx].transpose(1, 2) if cosines is None else cosines(t, ctx)
        aff = torch.exp(cos / temperature)  # (F, hw_tar, hw_src)
        aff = aff * mask
        aff = aff.transpose(2, 1).reshape(-1, h * w)  # (F*hw_src, hw_tar)
        kth = aff.topk(k, dim=0).values.min(dim=0).values
        aff[aff < kth] = 0
        aff = aff / aff.sum(dim=0, keepdim=True)
        seg = torch.cat(segs, dim=1).to(aff.dtype) @ aff  # (C, hw_tar)
        outs.append(seg.reshape(C, h, w))
        if n_last and len(queue) == n_last:
            queue.pop(0)
        if n_last:
            queue.append((t, seg))
    return outs


def ours(feats, labels0, cfg):
    feats = feats.clone().requires_grad_(True)  # features straight from a model may carry grad
    prop = LabelPropagator(cfg)
    prop.start(feats[0], labels0)
    return [prop.step(feats[t]) for t in range(1, feats.shape[0])]


def random_video(T=9, h=6, w=7, D=8, C=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(T, h, w, D, generator=g)
    lab = torch.randint(0, C, (h, w), generator=g)
    return feats, F.one_hot(lab, C).permute(2, 0, 1).float()


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize(
    "n_last,radius,k,tile",
    [(3, 2, 5, (8, 16)), (3, 2, 5, 3), (7, 1, 5, (2, 5)), (2, 0, 4, 4), (0, 3, 1, (5, 2)), (4, 12, 5, 8)],
)
def test_equals_brute_force(n_last, radius, k, tile, batched):
    # batched: the GPU's way (a strip of tiles at a time), run here on the CPU
    feats, labels0 = random_video()
    cfg = PropagationConfig(
        n_last_frames=n_last, neighborhood=radius, topk=k, temperature=0.1, tile=tile, batched=batched
    )
    want = brute_force(feats, labels0, n_last, radius, k, 0.1)
    got = ours(feats, labels0, cfg)
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"frame {t + 1}")


@pytest.mark.parametrize("batched", [False, True])
def test_bf16_path_equals_brute_force_on_its_own_rounding(batched):
    # the 16-bit path rounds the unit features to bf16, forms (cos - 1) with one more dimension, and
    # rounds that product to bf16; the brute force does the same arithmetic densely
    feats, labels0 = random_video(T=6, h=8, w=9, D=32)
    n = F.normalize(feats, dim=-1)
    q = torch.cat([n, -torch.ones(*n.shape[:-1], 1)], -1).bfloat16().double()
    k = torch.cat([n, torch.ones(*n.shape[:-1], 1)], -1).bfloat16().double()

    def rounded_cos(t, ctx):  # (F, hw_tar, hw_src)
        prod = q[t].reshape(-1, q.shape[-1]) @ k[ctx].reshape(len(ctx), -1, k.shape[-1]).transpose(1, 2)
        return prod.bfloat16().double() + 1

    want = brute_force(feats, labels0, 3, 3, 5, 0.1, cosines=rounded_cos)
    cfg = PropagationConfig(n_last_frames=3, neighborhood=3, similarity_dtype=torch.bfloat16, batched=batched)
    got = ours(feats, labels0, cfg)
    for t, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-5, msg=f"frame {t + 1}")


def test_bf16_similarities_stay_close_to_fp32():
    feats, labels0 = random_video(T=5, h=8, w=9, D=32)
    fp32 = ours(feats, labels0, PropagationConfig(neighborhood=3))
    bf16 = ours(feats, labels0, PropagationConfig(neighborhood=3, similarity_dtype=torch.bfloat16))
    for a, b in zip(fp32, bf16):
        assert (a - b).abs().max() < 0.2
        assert (a.argmax(0) == b.argmax(0)).float().mean() > 0.8


@pytest.mark.parametrize("batched", [False, True])
def test_ties_keep_every_equal_value(batched):
    # features from 3 distinct one-hot vectors: cosine similarities are exactly 0 or 1, so many
    # context patches tie at the k-th value and the reference keeps them all
    T, h, w = 5, 5, 6
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 3, (T, h, w), generator=g)
    feats = F.one_hot(ids, 4).float()
    labels0 = F.one_hot(torch.randint(0, 3, (h, w), generator=g), 3).permute(2, 0, 1).float()
    cfg = PropagationConfig(n_last_frames=3, neighborhood=2, topk=2, tile=4, batched=batched)
    want = brute_force(feats, labels0, 3, 2, 2, 0.1)
    got = ours(feats, labels0, cfg)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    aff = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0], [4.0, 2.0, 1.0, 0.0, 0.0]])
    weights, idx = joint_topk(aff, 2)
    assert (weights[0] > 0).sum() == 4 and (weights[1] > 0).sum() == 2  # ties kept, nothing else
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    many = torch.cat([torch.full((1, 20), 2.0), torch.ones(1, 20)], dim=1)  # more ties than the margin
    weights, idx = joint_topk(many, 2, margin=3)
    assert (weights > 0).sum() == 20 and set(idx[0][weights[0] > 0].tolist()) == set(range(20))


def test_output_step_matches_reference_loop():
    g = torch.Generator().manual_seed(1)
    soft = torch.rand(3, 4, 5, generator=g)
    soft[2] = 0  # an absent object: max 0, left as it is
    up = F.interpolate(soft[None], scale_factor=4, mode="bilinear", align_corners=False)[0]
    for c in range(3):  # the reference's norm_mask
        if up[c].max() > 0:
            up[c] = (up[c] - up[c].min()) / (up[c] - up[c].min()).max()
    want = up.argmax(0)
    torch.testing.assert_close(soft_labels_to_mask(soft, 4), want)


def test_first_mask_nearest_and_frame_resize():
    mask = np.zeros((480, 854), np.uint8)
    mask[100:300, 200:500] = 2
    mask[0:10, 0:10] = 255  # void counts as background
    lab = davis.first_frame_labels(mask, (30, 52))
    assert lab.shape == (3, 30, 52) and torch.all(lab.sum(0) == 1)
    want = np.asarray(Image.fromarray(np.where(mask == 255, 0, mask)).resize((52, 30), Image.NEAREST))
    np.testing.assert_array_equal(lab.argmax(0).numpy(), want)
    assert davis.propagation_size(480, 854) == (480, 832)
    assert davis.propagation_size(480, 910) == (480, 896)
    assert davis.propagation_size(1080, 720) == (704, 480)
    # bilinear without antialiasing (OpenCV INTER_LINEAR): half-pixel centres, edge clamping
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)
    got = davis.resize_bilinear_uint8(img, (6, 16)).permute(1, 2, 0).numpy()

    def coords(n_out, n_in):
        s = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
        s = np.maximum(s, 0)
        i0 = np.minimum(np.floor(s).astype(int), n_in - 1)
        return i0, np.minimum(i0 + 1, n_in - 1), s - i0

    y0, y1, fy = coords(6, 12)
    x0, x1, fx = coords(16, 20)
    f = img.astype(np.float64)
    top = f[y0][:, x0] * (1 - fx)[None, :, None] + f[y0][:, x1] * fx[None, :, None]
    bot = f[y1][:, x0] * (1 - fx)[None, :, None] + f[y1][:, x1] * fx[None, :, None]
    want = top * (1 - fy)[:, None, None] + bot * fy[:, None, None]
    assert np.abs(got - want).max() <= 0.5 + 1e-4 and np.all(got == np.round(got))


MEMORY_SCRIPT = textwrap.dedent(
    """
    import resource, torch
    torch.set_num_threads(2)
    from dinokit.eval.propagation import LabelPropagator, PropagationConfig
    h, w, D, C = 60, 144, 384, 4  # a 480x1152 frame at patch 8
    g = torch.Generator().manual_seed(0)
    feat = lambda: torch.randn(h, w, D, generator=g)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    prop = LabelPropagator(PropagationConfig())
    lab0 = torch.nn.functional.one_hot(torch.randint(0, C, (h, w), generator=g), C).permute(2, 0, 1).float()
    prop.start(feat(), lab0)
    for _ in range(7):  # a full queue: frame 0 + 7 previous frames with soft labels
        prop.remember(feat(), torch.rand(C, h, w, generator=g).softmax(0))
    out = prop.step(feat())
    assert out.shape == (C, h, w) and torch.allclose(out.sum(0), torch.ones(h, w), atol=1e-4)
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


@pytest.mark.slow
def test_peak_memory_patch8_full_queue():
    r = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    before_kb, peak_kb = map(int, r.stdout.split())
    # the dense formulation would hold 8 x (8640 x 8640) float32 affinities = 2.4 GB at least twice
    assert peak_kb < 4 * 1024 * 1024, f"peak memory {peak_kb / 1024**2:.2f} GB"


@pytest.mark.parametrize("batched", [False, True])
def test_a_propagator_reused_on_other_grids_equals_brute_force(batched):
    # the scratch kept between frames depends on the grid: 6 and 5 rows cut the frame's rows at
    # different places in the same tiles (no queue, so every step has one context frame and the
    # scratch would otherwise carry over from one video to the next)
    cfg = PropagationConfig(n_last_frames=0, neighborhood=2, topk=3, tile=(2, 3), batched=batched)
    prop = LabelPropagator(cfg)
    for h, w in ((6, 7), (5, 7), (6, 7)):
        feats, labels0 = random_video(T=4, h=h, w=w, D=16)
        prop.start(feats[0], labels0)
        reused = [prop.step(feats[t]) for t in range(1, 4)]
        for a, b in zip(reused, brute_force(feats, labels0, 0, 2, 3, 0.1)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_output_step_a_constant_channel_wins_as_in_the_reference():
    # a channel that is constant and positive normalises to 0/0 = NaN; the reference's max (and
    # argmax) take NaN as the largest value, so a full-frame object keeps its label
    soft = torch.zeros(3, 3, 4)
    soft[2] = 1.0
    assert torch.equal(soft_labels_to_mask(soft, 2), torch.full((6, 8), 2))
    soft[1] = 0.5  # two constant channels: the first NaN wins
    assert torch.equal(soft_labels_to_mask(soft, 2), torch.full((6, 8), 1))
