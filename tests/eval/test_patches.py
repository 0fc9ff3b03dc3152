"""The dense-feature pictures' algorithms against independent facts: scikit-learn's PCA on the stacked
features, Otsu's threshold of scikit-image, grids built so the foreground and the parts are known,
and the backbone's own tokens with the registers counted out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.eval.patches import (
    PatchesConfig,
    analyse_patches,
    cluster_parts,
    fit_pca,
    foreground_split,
    otsu_threshold,
    patch_features,
    patch_tokens,
    patches_picture,
)


def _grids(seed=0, dim=12):
    rng = np.random.default_rng(seed)
    return [
        rng.normal(size=(5, 7, dim)).astype(np.float32),
        rng.normal(size=(4, 3, dim)).astype(np.float32) * 2 + 1,
    ]


def test_joint_pca_is_sklearn_pca_of_the_stacked_features():
    from sklearn.decomposition import PCA

    grids = _grids()
    rows = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids]).astype(np.float64)
    ours = fit_pca(rows, 4)
    ref = PCA(n_components=4, svd_solver="full").fit(rows)
    signs = np.sign((ours.components * ref.components_).sum(1))
    assert np.all(np.abs(signs) == 1)
    np.testing.assert_allclose(ours.components * signs[:, None], ref.components_, atol=1e-8)
    np.testing.assert_allclose(ours.explained_variance, ref.explained_variance_, rtol=1e-8)
    np.testing.assert_allclose(ours.explained_variance_ratio, ref.explained_variance_ratio_, rtol=1e-8)
    np.testing.assert_allclose(ours.transform(rows) * signs, ref.transform(rows), atol=1e-8)
    # the sign convention: each axis's largest loading is positive
    big = ours.components[np.arange(4), np.abs(ours.components).argmax(1)]
    assert (big > 0).all()


def test_otsu_threshold_agrees_with_scikit_image():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(1)
    v = np.clip(np.concatenate([rng.normal(0.2, 0.05, 3000), rng.normal(0.7, 0.08, 1000)]), 0, 1)
    assert abs(otsu_threshold(v) - threshold_otsu(v, nbins=256)) <= 2 / 256
    assert 0.3 < otsu_threshold(v) < 0.6


def _object_grids(swap: bool, dim=16, noise=0.05, seed=0):
    """Two grids of a background vector with an object vector inside; the object masks are known."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=dim), rng.normal(size=dim)
    if swap:
        a, b = b, a
    grids, masks = [], []
    for (h, w), (r0, r1, c0, c1) in (((8, 10), (2, 6, 3, 8)), ((9, 6), (1, 5, 1, 4))):
        m = np.zeros((h, w), bool)
        m[r0:r1, c0:c1] = True
        g = np.where(m[..., None], b, a) + noise * rng.normal(size=(h, w, dim))
        grids.append(g.astype(np.float32))
        masks.append(m)
    return grids, masks


@pytest.mark.parametrize("swap", [False, True])
def test_foreground_is_the_known_object_whatever_the_axis_sign(swap):
    grids, masks = _object_grids(swap)
    rows = np.concatenate([g.reshape(-1, g.shape[-1]) for g in grids])
    split = foreground_split(fit_pca(rows, 2), grids)
    for got, want in zip(split.masks, masks):
        np.testing.assert_array_equal(got, want)
    assert split.method == "otsu" and 0 < split.threshold < 1
    # the scaled first component spans [0, 1] over the images together
    values = np.concatenate([f.ravel() for f in split.first])
    assert values.min() == 0 and values.max() == pytest.approx(1)
    # a given threshold is used as given
    assert foreground_split(fit_pca(rows, 2), grids, threshold=0.99).threshold == 0.99


def test_the_same_features_get_the_same_colour_mask_and_part_in_every_image():
    grids, _ = _object_grids(False, noise=0.3)
    mirrored = grids[0][:, ::-1].copy()  # the first image's patches again, in another place
    res = analyse_patches([grids[0], grids[1], mirrored], parts=3)
    np.testing.assert_array_equal(res.colours[2], res.colours[0][:, ::-1])
    np.testing.assert_array_equal(res.foreground[2], res.foreground[0][:, ::-1])
    np.testing.assert_array_equal(res.parts[2], res.parts[0][:, ::-1])
    np.testing.assert_array_equal(res.first[2], res.first[0][:, ::-1])
    # colours only on the foreground, in [0, 1]
    for c, m in zip(res.colours, res.foreground):
        assert (c[~m] == 0).all() and 0 <= c.min() and c.max() <= 1
    rec = res.record
    assert rec["colour_components"] == [1, 2, 3] and rec["first_component"]["threshold_method"] == "otsu"
    assert rec["fit_patches"] == rec["patches"] == sum(g.shape[0] * g.shape[1] for g in res.first)


def test_kmeans_parts_are_shared_across_images_and_numbered_by_size():
    rng = np.random.default_rng(3)
    protos = rng.normal(size=(3, 8)) * 5
    layouts = [rng.choice(3, size=(6, 6), p=[0.6, 0.3, 0.1]), rng.choice(3, size=(4, 9), p=[0.2, 0.3, 0.5])]
    grids = [(protos[lab] + 0.01 * rng.normal(size=(*lab.shape, 8))).astype(np.float32) for lab in layouts]
    labels, sizes, _ = cluster_parts(grids, 3, seed=0)
    truth = np.concatenate([lab.ravel() for lab in layouts])
    found = np.concatenate([lab.ravel() for lab in labels])
    # one part per prototype, the same one in both images
    mapping = {int(t): {int(f) for f in found[truth == t]} for t in range(3)}
    assert all(len(v) == 1 for v in mapping.values())
    assert len(set().union(*mapping.values())) == 3
    assert list(sizes) == sorted(sizes, reverse=True)
    np.testing.assert_array_equal(np.bincount(found, minlength=3), sizes)
    assert int(np.bincount(found).argmax()) == 0


def test_a_sample_is_fitted_beyond_the_patch_limit_and_recorded():
    grids, _ = _object_grids(False)
    res = analyse_patches(grids, parts=2, fit_patches=50)
    assert res.record["fit_patches"] == 50 and res.record["patches"] == 80 + 54


@pytest.mark.parametrize(
    "arch,registers", [("dinov2_vits14_reg", 4), ("dinov3_vits16", 4), ("dinov2_vits14", 0)]
)
def test_patch_tokens_drop_the_registers(arch, registers):
    torch.manual_seed(0)
    model = dinokit.build_backbone(arch, embed_dim=32, depth=1, num_heads=1).eval()
    p = model.patch_size
    x = torch.randn(2, 3, 3 * p, 5 * p)
    grid = patch_tokens(model, x)
    assert grid.shape == (2, 3, 5, 32)
    with torch.no_grad():
        every = model.forward_all_tokens(x)
    assert every.shape[1] == 1 + registers + 15
    torch.testing.assert_close(grid, every[:, 1 + registers :].reshape(2, 3, 5, 32))


def test_features_of_a_non_square_image_keep_its_aspect():
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=1).eval()
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 70, 3), dtype=np.uint8))
    tall = img.transpose(Image.Transpose.TRANSPOSE)
    found = list(patch_features(model, [("wide", img), ("tall", tall)], PatchesConfig(image_size=32)))
    # shorter side 32, longer 56, cropped to 48: a 2x3 grid and its transpose
    assert found[0].features.shape == (2, 3, 192) and found[0].image.shape == (32, 48, 3)
    assert found[1].features.shape == (3, 2, 192) and found[1].image.shape == (48, 32, 3)
    assert found[0].original_size == (70, 40)


def test_patches_picture_for_a_few_images():
    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=1).eval()
    rng = np.random.default_rng(0)
    imgs = [
        (f"img{i}", Image.fromarray(rng.integers(0, 255, (48, 64 + 16 * i, 3), dtype=np.uint8)))
        for i in range(3)
    ]
    pic = patches_picture(model, imgs, parts=3, image_size=48, width=600)
    assert pic.dtype == np.uint8 and pic.ndim == 3 and pic.shape[1] == 600


def test_features_use_the_given_normalisation():
    from dinokit.data.normalization import Normalization
    from dinokit.eval.attention import preprocess

    torch.manual_seed(0)
    model = dinokit.build_backbone("vit_tiny", 16, depth=1).eval()
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 48, 3), dtype=np.uint8))
    norm = Normalization((0.43, 0.411, 0.296), (0.213, 0.156, 0.143), "test")
    got = next(patch_features(model, [("a", img)], PatchesConfig(image_size=32), normalization=norm))
    _, rgb = preprocess(img, 32, 16, keep_aspect=True)
    x = torch.from_numpy(rgb.astype(np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(norm.mean).view(3, 1, 1)) / torch.tensor(norm.std).view(3, 1, 1)
    want = patch_tokens(model, x[None])[0].numpy()
    np.testing.assert_allclose(got.features, want, atol=1e-4)
    default = next(patch_features(model, [("a", img)], PatchesConfig(image_size=32)))
    assert not np.allclose(default.features, want, atol=1e-3)
