"""The guards that keep wrong numbers and hostile input out, each held against the failure it stops:
non-finite weights and features, the k-NN vote at small temperatures (against a float64
formulation), 16-bit images, decompression bombs, symbolic-link loops, hostile COCO geometry,
checkpoints of the wrong shapes, and a synth output folder holding someone else's files."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dinokit
from dinokit.checkpoints import backbone_state_dict, load_backbone, load_linear_head
from dinokit.data.images import expand_image_inputs, find_images, open_rgb, scan_labelled_folder
from dinokit.data.masks import annotation_mask, read_label_mask
from dinokit.errors import CheckpointError, DataError, OutputExistsError
from dinokit.eval.knn import knn_classify, knn_predict
from dinokit.eval.metrics import require_finite
from tests.helpers import make_image, memory_headroom, write_bomb_png


# -- helpers ---------------------------------------------------------------------------------------
def _tiny_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return backbone_state_dict(dinokit.build_backbone("vit_tiny", 16, depth=2))


# -- weights ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_backbone_weights_are_refused_naming_the_tensor(tmp_path, bad):
    sd = _tiny_state_dict()
    sd["blocks.1.mlp.fc1.weight"][3, 4] = bad
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(
        CheckpointError, match=r"non-finite values \(NaN or inf\) in blocks\.1\.mlp\.fc1\.weight"
    ):
        load_backbone(tmp_path / "w.pth")
    # inside a training checkpoint too
    torch.save({"teacher": {"backbone." + k: v for k, v in sd.items()}}, tmp_path / "ck.pth")
    with pytest.raises(CheckpointError, match="blocks.1.mlp.fc1.weight"):
        load_backbone(tmp_path / "ck.pth")


def test_nonfinite_linear_head_is_refused(tmp_path):
    w = torch.zeros(3, 8)
    w[1, 2] = float("nan")
    torch.save(
        {"state_dict": {"module.linear.weight": w, "module.linear.bias": torch.zeros(3)}}, tmp_path / "l.pth"
    )
    with pytest.raises(CheckpointError, match="non-finite values .* in linear.weight"):
        load_linear_head(tmp_path / "l.pth")


def test_safetensors_with_wrong_shapes_is_one_sentence(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    sd = _tiny_state_dict()
    odd = dict(sd, **{"patch_embed.proj.weight": torch.zeros(193, 3, 16, 16)})
    safetensors.save_file({k: v.contiguous() for k, v in odd.items()}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(CheckpointError, match="has tensor shapes that fit no"):
        load_backbone(tmp_path / "odd.safetensors")
    wrong = dict(sd, **{"blocks.0.attn.qkv.weight": torch.zeros(500, 192)})
    safetensors.save_file({k: v.contiguous() for k, v in wrong.items()}, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight has shape"):
        load_backbone(tmp_path / "wrong.safetensors")


# -- features --------------------------------------------------------------------------------------
def test_require_finite_and_knn_refuse_nonfinite_features():
    good = torch.randn(6, 4)
    require_finite(good, "The features")
    bad = good.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(DataError, match=r"The features hold non-finite values \(NaN or inf\) in 1 of 6 rows"):
        require_finite(bad, "The features")
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    with pytest.raises(DataError, match="non-finite"):
        knn_classify(bad, labels, good, labels, ks=[1])
    with pytest.raises(DataError, match="The test features hold non-finite"):
        knn_classify(good, labels, bad, labels, ks=[1])


# -- the k-NN vote ---------------------------------------------------------------------------------
def _float64_ranking(train, train_labels, test, k, temperature, num_classes):
    """The vote as a float64 formulation: per class, log of the sum of exp(sim / T) over the k nearest
    neighbours (a log-sum-exp, so that no T overflows); classes ranked by it, ties to the lower index."""
    train_n = torch.nn.functional.normalize(train.float(), dim=1)
    test_n = torch.nn.functional.normalize(test.float(), dim=1)
    sim = test_n @ train_n.T  # the same similarities the k-NN ranks
    top_sim, top_idx = sim.topk(k, dim=1)
    scores = torch.full((len(test), num_classes), -math.inf, dtype=torch.float64)
    for q in range(len(test)):
        for c in range(num_classes):
            mine = top_sim[q][train_labels[top_idx[q]] == c].double() / temperature
            if len(mine):
                scores[q, c] = torch.logsumexp(mine, dim=0)
    return scores


@pytest.mark.parametrize("temperature", [0.07, 0.005, 1e-6])
def test_knn_vote_equals_a_float64_formulation(temperature):
    g = torch.Generator().manual_seed(0)
    C, D = 4, 16
    centres = torch.randn(C, D, generator=g)
    train_labels = torch.arange(60) % C
    train = centres[train_labels] + 0.8 * torch.randn(60, D, generator=g)
    test_labels = torch.arange(40) % C
    test = centres[test_labels] + 0.8 * torch.randn(40, D, generator=g)
    for k in (1, 3, 10):
        preds = knn_predict(train, train_labels, test, [k], temperature, C)
        scores = _float64_ranking(train, train_labels, test, k, temperature, C)
        best = scores.max(dim=1).values
        for q in range(len(test)):
            winners = (scores[q] == best[q]).nonzero().flatten()
            assert int(preds.ranked[k][q, 0]) == int(winners[0]), (k, q)
        if temperature >= 0.01:  # no vote underflows: the whole ranking agrees
            expected = scores.sort(dim=1, descending=True, stable=True).indices[:, : preds.ranked[k].shape[1]]
            assert torch.equal(preds.ranked[k], expected)


def test_knn_small_temperature_picks_the_close_class_not_the_lowest_index():
    # each query's three nearest training images: two of class 2 (close) and one of class 0 (far)
    train = torch.tensor([[1.0, 0.0], [0.99, 0.141], [0.6, 0.8], [-1.0, 0.0]])
    train_labels = torch.tensor([2, 2, 0, 1])
    test = torch.tensor([[1.0, 0.05]])
    acc = knn_classify(
        train, train_labels, test, torch.tensor([2]), ks=[1, 3], temperature=0.005, num_classes=3
    )
    assert acc[1][0] == 100.0 and acc[3][0] == 100.0


def test_knn_exact_ties_still_go_to_the_lower_class():
    train = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    train_labels = torch.tensor([1, 0, 2])
    preds = knn_predict(train, train_labels, torch.tensor([[1.0, 0.0]]), [2], 0.07, 3)
    assert preds.ranked[2][0].tolist()[:2] == [0, 1]


# -- images ----------------------------------------------------------------------------------------
def test_16bit_grey_png_is_scaled_to_8_bits(tmp_path):
    values = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    rgb = np.asarray(open_rgb(tmp_path / "g16.png"))
    assert rgb.shape == (32, 32, 3)
    expected = (values >> 8).astype(np.uint8)
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], expected)


def test_16bit_mask_png_gives_its_label_values(tmp_path):
    labels = np.array([[0, 1, 2, 300], [65535, 1000, 256, 7]], dtype=np.uint16)
    Image.fromarray(labels).save(tmp_path / "m16.png")
    np.testing.assert_array_equal(read_label_mask(tmp_path / "m16.png"), labels.astype(np.int32))


def test_decompression_bomb_is_an_unreadable_image(tmp_path):
    bomb = write_bomb_png(tmp_path / "bomb.png")
    assert bomb.stat().st_size < 1 << 20
    with pytest.raises(DataError, match="is not a readable image .*decompression bomb"):
        open_rgb(bomb)
    with pytest.raises(DataError, match="is not a readable mask image"):
        read_label_mask(bomb)


def _loop_folder(tmp_path: Path, links: int) -> Path:
    root = tmp_path / "loop"
    make_image(root / "a" / "x.png", size=(8, 8))
    make_image(root / "b" / "y.png", size=(8, 8))
    make_image(root / "z.png", size=(8, 8))
    for i, where in enumerate(("a", "b")[:links]):
        os.symlink("..", root / where / f"up{i}")
    return root


@pytest.mark.parametrize("links", [1, 2])
def test_scans_follow_links_but_visit_each_folder_and_file_once(tmp_path, caplog, monkeypatch, links):
    root = _loop_folder(tmp_path, links)
    (root / "c").mkdir()
    os.symlink("../z.png", root / "c" / "z-again.png")
    scanned = []  # each real folder listed once, however many links lead back into it
    scandir = os.scandir

    def counting_scandir(path):
        scanned.append(os.path.realpath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    found = find_images(root)
    monkeypatch.setattr(os, "scandir", scandir)
    assert sorted(scanned) == sorted(set(scanned))
    assert sorted(p.name for p in found) == ["x.png", "y.png", "z.png"]
    assert "skipped" in caplog.text
    assert sorted(p.name for p in expand_image_inputs([root, root / "a", root / "z.png"])) == [
        "x.png",
        "y.png",
        "z.png",
    ]


def test_labelled_scan_with_a_link_loop_keeps_each_image_in_its_class(tmp_path):
    root = tmp_path / "train"
    for c in ("cat", "dog"):
        for i in range(2):
            make_image(root / c / f"{i}.png", size=(8, 8), seed=i)
    os.symlink("..", root / "cat" / "up")
    os.symlink("../dog", root / "cat" / "dogs")
    folder = scan_labelled_folder(root)
    assert len(folder) == 4
    assert sorted((p.parent.name, t) for p, t in folder.samples) == [
        ("cat", 0),
        ("cat", 0),
        ("dog", 1),
        ("dog", 1),
    ]


# -- COCO ------------------------------------------------------------------------------------------
def test_coco_huge_coordinate_is_cut_to_the_image_with_bounded_memory():
    ann = {"id": 9, "segmentation": [[4, 4, 1e308, 4, 28, 28, 4, 28]]}
    with memory_headroom():
        mask = annotation_mask(ann, 32, 32)
    assert mask.shape == (32, 32) and mask[10, 10] and not mask[2, 2]
    # a polygon partly outside the image keeps exactly the pixels it had inside it
    from pycocotools import mask as mask_utils

    outside = [[-10, 5, 5, -10, 20, 20]]
    reference = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(outside, 32, 32))).astype(bool)
    np.testing.assert_array_equal(annotation_mask({"segmentation": outside}, 32, 32), reference)


@pytest.mark.parametrize(
    "segmentation, needle",
    [
        ([[4, 4]], "needs at least 3"),
        ([[4, 4, 8, 8]], "needs at least 3"),
        ([[4, 4, 8, 8, 9]], "needs at least 3"),
        ([[4, 4, float("nan"), 4, 5, 5]], "non-finite"),
        ([[4, 4, 10**400, 4, 5, 5]], "non-finite"),
        ([["a", 4, 8, 8, 4, 8]], "not a list of numbers"),
        ({"size": [100000, 100000], "counts": [1]}, "not the image's [32, 32]"),
        ({"size": [32, 32], "counts": [10**12]}, "covering"),
        ({"size": [32, 32], "counts": "P"}, "ends in the middle"),
    ],
)
def test_coco_hostile_segmentation_is_one_sentence(segmentation, needle):
    with memory_headroom(), pytest.raises(DataError) as e:
        annotation_mask({"id": 5, "segmentation": segmentation}, 32, 32)
    assert needle in str(e.value) and str(e.value).startswith("Annotation 5 ")


# -- synth output folders ----------------------------------------------------------------------------
def test_synth_refuses_a_folder_it_did_not_write_whatever_the_flag(tmp_path):
    from dinokit.data.synth import make_classify_dataset

    out = tmp_path / "mine"
    make_image(out / "train" / "myclass" / "photo.png", size=(8, 8))
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="did not write"):
            make_classify_dataset(out, classes=2, per_class=2, val_fraction=0.5, size=16, overwrite=overwrite)
    assert (out / "train" / "myclass" / "photo.png").is_file()


def test_synth_overwrite_removes_only_its_own_output(tmp_path):
    from dinokit.data.synth import make_classify_dataset
    from dinokit.data.synth_video import make_video_dataset

    out = tmp_path / "set"
    make_classify_dataset(out, classes=2, per_class=2, val_fraction=0.5, size=16)
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        make_classify_dataset(out, classes=2, per_class=2, val_fraction=0.5, size=16)
    make_video_dataset(out, sequences=1, frames=2, height=16, width=16, objects="1", overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "train").exists() and (out / "JPEGImages").is_dir()
    assert json.loads((out / "synth.json").read_text())["kind"] == "video"
