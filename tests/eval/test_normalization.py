"""Normalisation belongs to the weights: DINOv3's satellite weights get the DINOv3 README's SAT-493M
mean/std, a file that keeps its own is read, an unknown file says once which it assumed, and
--mean/--std override everywhere images are read."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torchvision import transforms as T

import dinokit
from dinokit.checkpoints import BackboneOptions, prepare_backbone
from dinokit.data.images import read_image
from dinokit.eval.features import Embedder, FeatureSpec, scan_images
from tests.helpers import make_image, run_cli

#: the DINOv3 README's transform for the SAT-493M weights, written out here
README_SAT_MEAN, README_SAT_STD = (0.430, 0.411, 0.296), (0.213, 0.156, 0.143)


@pytest.fixture
def sat_file(tmp_path):
    """A SAT-style file: a plain backbone state dict under the released satellite file's name."""
    torch.manual_seed(0)
    path = tmp_path / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), path)
    return path


def _spec(weights, **kw):
    return FeatureSpec(
        weights=str(weights), resize=32, crop=32, batch_size=4, device="cpu", precision="fp32", **kw
    )


def test_satellite_weights_are_normalised_with_their_own_values(sat_file, tmp_path):
    images = tmp_path / "imgs"
    for i in range(3):
        make_image(images / "a" / f"{i}.png", seed=i)
    emb = Embedder(_spec(sat_file))
    assert emb.normalization.mean == README_SAT_MEAN and emb.normalization.std == README_SAT_STD
    fs = emb.embed(images)
    # the features equal the model on images normalised by hand with the README's numbers
    by_hand = T.Compose(
        [T.Resize(32, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor()]
    )
    x = torch.stack([by_hand(read_image(p).image) for p in scan_images(images).paths])
    x = (x - torch.tensor(README_SAT_MEAN).view(1, 3, 1, 1)) / torch.tensor(README_SAT_STD).view(1, 3, 1, 1)
    model = dinokit.load_backbone(sat_file)
    with torch.no_grad():
        assert torch.allclose(fs.features, model(x), atol=1e-5)
    assert fs.fingerprint["normalization"]["mean"] == list(README_SAT_MEAN)
    # ImageNet's numbers give other features: the normalisation did matter
    with torch.no_grad():
        x_in = (
            x * torch.tensor(README_SAT_STD).view(1, 3, 1, 1)
            + torch.tensor(README_SAT_MEAN).view(1, 3, 1, 1)
            - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        ) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        assert not torch.allclose(fs.features, model(x_in), atol=1e-3)


def test_a_file_keeps_its_own_values_and_options_override(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "own.pth"
    sd = dinokit.build_backbone("vit_tiny", 16, depth=1).state_dict()
    torch.save({"model": sd, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}, path)
    model = prepare_backbone(BackboneOptions(weights=str(path)), _spec(path)).model
    assert model.normalization.mean == (0.5, 0.5, 0.5) and model.normalization.std == (0.25, 0.25, 0.25)
    model = prepare_backbone(BackboneOptions(weights=str(path), std=(0.1, 0.2, 0.3)), _spec(path)).model
    assert model.normalization.mean == (0.5, 0.5, 0.5) and model.normalization.std == (0.1, 0.2, 0.3)
    assert "--std" in model.normalization.source
    # released presets' names and random weights are ImageNet's, with no word about it
    assert prepare_backbone(_spec("random")).model.normalization.mean == (0.485, 0.456, 0.406)


def test_an_unknown_file_says_once_which_it_assumed(tmp_path, caplog):
    torch.manual_seed(0)
    path = tmp_path / "mystery.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=1), path)
    with caplog.at_level(logging.INFO, logger="dinokit"):
        a = dinokit.load_backbone(path)
        dinokit.load_backbone(path)
    said = [r.getMessage() for r in caplog.records if "normalised" in r.getMessage()]
    assert len(said) == 1 and "ImageNet" in said[0] and str(path) in said[0]
    assert a.normalization.mean == (0.485, 0.456, 0.406) and "assumed" in a.normalization.source
    # a released file under its own name is known: ImageNet's, nothing said
    released = tmp_path / "dinov2_vits14_pretrain.pth"
    released.write_bytes(path.read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dinokit"):
        b = dinokit.load_backbone(released)
    assert "released" in b.normalization.source and not [
        r for r in caplog.records if "normalised" in r.getMessage()
    ]


def test_cli_records_the_normalisation_and_refuses_bad_values(sat_file, labelled_folder, tmp_path):
    small = ["--resize", "32", "--image-size", "32", "--batch-size", "6", "--quiet", "--device", "cpu"]
    out = tmp_path / "knn"
    r = run_cli(
        [
            "knn",
            "--weights",
            sat_file,
            "--train",
            labelled_folder / "train",
            "--val",
            labelled_folder / "val",
            "--output",
            out,
            "--k",
            "3",
            *small,
        ]
    )
    assert r.exit_code == 0, r.output
    fp = json.loads((out / "metrics.json").read_text())["config"]["fingerprint"]
    assert fp["normalization"]["mean"] == list(README_SAT_MEAN) and "CLS" in fp["tokens"]
    r = run_cli(
        [
            "knn",
            "--weights",
            sat_file,
            "--train",
            labelled_folder / "train",
            "--val",
            labelled_folder / "val",
            "--output",
            tmp_path / "knn2",
            "--k",
            "3",
            "--mean",
            "0.5,0.5,0.5",
            "--std",
            "0.2,0.2,0.2",
            *small,
        ]
    )
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "knn2" / "metrics.json").read_text())["config"]
    assert cfg["fingerprint"]["normalization"] == {
        "mean": [0.5] * 3,
        "std": [0.2] * 3,
        "source": "--mean/--std",
    }
    for bad, word in (
        (["--mean", "0.5,0.5"], "three values"),
        (["--std", "0.2,-0.1,0.2"], "positive"),
        (["--mean", "0.5,1.5,0.5"], "[0, 1]"),
        (["--std", "a,b,c"], "numbers"),
    ):
        for command in ("features", "knn", "linear"):
            r = run_cli([command, "--weights", sat_file, "--output", tmp_path / "never", *bad])
            assert r.exit_code == 2, (command, bad, r.output)
            assert word in r.text and "Traceback" not in r.output and r.text.count("Error") == 1
    assert not (tmp_path / "never").exists()


# -- every other command that reads images follows the weights too --------------------------------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One SAT-style weights file and the smallest inputs of each image-reading command."""
    import pickle

    from dinokit.data.synth_segment import make_segment_dataset
    from dinokit.train.finetune import FinetuneConfig, finetune
    from tests.cli.test_davis import make_davis
    from tests.helpers import make_copydays, oxford_ground_truth

    root = tmp_path_factory.mktemp("norm")
    torch.manual_seed(0)
    sat = root / "dinov3_vitl16_pretrain_sat493m-eadcf0ff.pth"
    dinokit.save_backbone(dinokit.build_backbone("vit_tiny", 16, depth=2), sat)
    for i in range(4):
        make_image(root / "imgs" / f"{i}.png", size=(32, 32), seed=i, color=(200, 30 * i, 0))
    colors = {"red": (255, 0, 0), "green": (0, 255, 0)}
    for split, n in (("train", 4), ("val", 2)):
        for ci, (name, color) in enumerate(colors.items()):
            for i in range(n):
                make_image(
                    root / "data" / split / name / f"{i}.png", size=(36, 30), seed=10 * ci + i, color=color
                )
    make_copydays(root / "copydays", n_groups=2)
    jpg = root / "revisited" / "roxford5k" / "jpg"
    for i, name in enumerate([*(f"db_{k}" for k in range(8)), "q_0", "q_1"]):
        make_image(jpg / f"{name}.png", size=(48, 40), seed=i).rename(jpg / f"{name}.jpg")
    with open(root / "revisited" / "roxford5k" / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump(oxford_ground_truth(), f, protocol=2)
    make_davis(root / "DAVIS", n_frames=2, seqs=("squares",))
    seg = make_segment_dataset(root / "seg", layout="folder", classes=2, train=2, val=1, size=32).root
    # predict reads a model that finetune wrote from the SAT weights (1 epoch)
    cfg = FinetuneConfig(train=root / "data" / "train", val=root / "data" / "val", output=root / "ft", weights=str(sat),
                         epochs=1, batch_size=4, image_size=32, num_workers=0, precision="fp32", device="cpu",
                         warmup_epochs=0)  # fmt: skip
    assert finetune(cfg).finished
    return {"root": root, "sat": sat, "seg": seg, "model": root / "ft" / "model.pth"}


def _command(name: str, w: dict, out) -> tuple[list, object, tuple[str, ...]]:
    """(the command line, the JSON file it writes and where in it the normalisation is recorded)."""
    r, sat, cpu = w["root"], w["sat"], ["--device", "cpu", "--quiet"]
    config = ("config", "normalization")
    return {
        "attn": (
            ["attn", r / "imgs", "--weights", sat, "--image-size", 32, "--output", out, *cpu],
            out / "metrics.json",
            config,
        ),
        "similar": (
            [
                "similar",
                r / "imgs" / "0.png",
                "--against",
                r / "imgs",
                "--weights",
                sat,
                "--image-size",
                32,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "duplicates": (
            ["duplicates", r / "imgs", "--weights", sat, "--image-size", 32, "--output", out, *cpu],
            out / "metrics.json",
            config,
        ),
        "copydetect": (
            [
                "copydetect",
                "--data",
                r / "copydays",
                "--weights",
                sat,
                "--image-size",
                32,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "retrieval": (
            [
                "retrieval",
                "--data",
                r / "revisited",
                "--dataset",
                "roxford5k",
                "--weights",
                sat,
                "--image-size",
                32,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "davis": (
            [
                "davis",
                "--data",
                r / "DAVIS",
                "--weights",
                sat,
                "--image-size",
                32,
                "--num-workers",
                0,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "segment": (
            [
                "segment",
                "--data",
                w["seg"],
                "--dataset",
                "folder",
                "--weights",
                sat,
                "--iterations",
                2,
                "--batch-size",
                2,
                "--image-size",
                32,
                "--pictures",
                0,
                "--threads",
                1,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "finetune": (
            [
                "finetune",
                "--weights",
                sat,
                "--train",
                r / "data" / "train",
                "--val",
                r / "data" / "val",
                "--epochs",
                1,
                "--batch-size",
                4,
                "--image-size",
                32,
                "--num-workers",
                0,
                "--precision",
                "fp32",
                "--warmup-epochs",
                0,
                "--output",
                out,
                *cpu,
            ],
            out / "metrics.json",
            config,
        ),
        "predict": (
            ["predict", "--model", w["model"], r / "data" / "val", "--output", out / "preds.json", *cpu],
            out / "preds.json",
            ("normalization",),
        ),
    }[name]


def _recorded(path, keys) -> dict:
    record = json.loads(path.read_text())
    for k in keys:
        record = record[k]
    return record


@pytest.mark.parametrize(
    "name",
    ["attn", "similar", "duplicates", "copydetect", "retrieval", "davis", "segment", "finetune", "predict"],
)
def test_every_image_command_records_the_weights_normalisation(name, world, tmp_path):
    if name == "predict":  # predict writes a file, into a folder that must exist
        for sub in ("a", "b", "c"):
            (tmp_path / sub).mkdir()
    args, record, keys = _command(name, world, tmp_path / "a")
    r = run_cli(args)
    assert r.exit_code == 0, r.output
    got = _recorded(record, keys)
    assert got["mean"] == list(README_SAT_MEAN) and got["std"] == list(README_SAT_STD), got
    args, record, keys = _command(name, world, tmp_path / "b")
    r = run_cli([*args, "--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"])
    assert r.exit_code == 0, r.output
    assert _recorded(record, keys) == {"mean": [0.5] * 3, "std": [0.2] * 3, "source": "--mean/--std"}
    args, record, _ = _command(name, world, tmp_path / "c")
    r = run_cli([*args, "--std", "-1"])
    assert r.exit_code == 2 and "--std" in r.text and "Traceback" not in r.output, r.output
    assert r.text.count("Error") == 1
    assert not record.exists() and (not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir()))
    if name == "finetune":  # the model file keeps what the run used, for predict to read back
        saved = torch.load(tmp_path / "b" / "model.pth", weights_only=True)
        assert saved["mean"] == [0.5] * 3 and saved["std"] == [0.2] * 3


def test_attention_maps_see_the_weights_normalisation(sat_file, tmp_path):
    """The attention maps of SAT weights equal the model's on pictures normalised by hand with the
    README's numbers, and differ from ImageNet's."""
    from PIL import Image

    from dinokit.eval.attention import AttentionConfig, attention_maps

    model = prepare_backbone(BackboneOptions(weights=str(sat_file)), _spec(sat_file)).model
    pic = Image.open(make_image(tmp_path / "x.png", size=(32, 48), seed=3, color=(250, 200, 10))).convert(
        "RGB"
    )
    got = next(
        iter(attention_maps(model, [("x", pic)], AttentionConfig(image_size=None, precision="fp32")))
    ).maps
    x = T.ToTensor()(pic)[None]

    def maps(mean, std):
        with torch.no_grad():
            y = model.get_cls_attention(
                (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
            )
        return y.float().reshape(1, -1, 3, 2)[0].numpy()

    assert torch.allclose(
        torch.from_numpy(got), torch.from_numpy(maps(README_SAT_MEAN, README_SAT_STD)), atol=1e-5
    )
    imagenet = maps((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    assert not torch.allclose(torch.from_numpy(got), torch.from_numpy(imagenet), atol=1e-4)


def test_predict_uses_what_finetune_trained_with(world, tmp_path):
    """A model fine-tuned from SAT weights keeps their mean/std; predict's probabilities equal the
    model's on images normalised by hand with them."""
    from PIL import Image

    saved = torch.load(world["model"], weights_only=True)
    assert saved["mean"] == list(README_SAT_MEAN) and saved["std"] == list(README_SAT_STD)
    out = tmp_path / "p.json"
    images = sorted((world["root"] / "data" / "val").rglob("*.png"))
    r = run_cli(
        ["predict", "--model", world["model"], *images, "--k", 2, "--output", out, "--device", "cpu", "-q"]
    )
    assert r.exit_code == 0, r.output
    got = {p["path"]: p["top"][0]["probability"] for p in json.loads(out.read_text())["predictions"]}
    tf = T.Compose([T.Resize(37, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize(README_SAT_MEAN, README_SAT_STD)])  # fmt: skip
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        probs = (
            dinokit.load_backbone(world["model"])(x) @ saved["head"]["weight"].T + saved["head"]["bias"]
        ).softmax(-1)
    assert [got[str(p)] for p in images] == pytest.approx(probs.max(-1).values.tolist(), abs=1e-5)


def test_search_descriptors_are_made_with_the_weights_normalisation(world, tmp_path):
    """duplicates' and similar's descriptors go through the weights' Normalize, and their store is
    keyed by it: other --mean/--std make another store, not a reused one."""
    from dinokit.eval.similar import SimilarConfig
    from dinokit.eval.store import embed_for_search

    paths = sorted((world["root"] / "imgs").glob("*.png"))

    def stored(**kw):
        cfg = SimilarConfig(weights=str(world["sat"]), queries=[], against=world["root"] / "imgs", output=tmp_path / "o",
                            image_size=32, cache_dir=tmp_path / "stores", device="cpu", **kw)  # fmt: skip
        return embed_for_search(cfg, paths)

    first = stored()
    (norm,) = [t for t in first.embedder.transform.transforms if isinstance(t, T.Normalize)]
    assert tuple(norm.mean) == README_SAT_MEAN and tuple(norm.std) == README_SAT_STD
    other = stored(mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    assert other.embedded == len(paths) and other.store.folder != first.store.folder
