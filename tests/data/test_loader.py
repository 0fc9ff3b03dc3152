"""The prefetching loader: the same batches as torch's DataLoader in this process, in order, with
unreadable images skipped and counted by the toolkit's rule (or stopping the run with --strict), and
never more than two batches of items made ahead."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from dinokit.data.images import EXIF_ORIENTATION, ImageDataset, collate_skip_none, readable_batches
from dinokit.data.loader import PrefetchLoader, decode_threads, image_loader, prefetch_map
from dinokit.data.transforms import eval_transform
from dinokit.errors import DataError
from dinokit.eval.features import compute_features
from tests.helpers import make_image, tiny_vit


@pytest.fixture
def folder_with_a_bad_file(tmp_path):
    paths = [make_image(tmp_path / f"{i:02d}.png", (40 + i, 36), seed=i) for i in range(11)]
    (tmp_path / "05.png").write_bytes(b"not an image")
    return paths


def test_prefetch_gives_the_batches_of_the_dataloader_in_order(folder_with_a_bad_file):
    ds = ImageDataset(folder_with_a_bad_file, transform=eval_transform(32, 32), strict=False)
    plain = list(torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate_skip_none))
    for threads in (1, 3):
        got = list(PrefetchLoader(ds, 4, threads))
        assert len(got) == len(plain) == 3
        for (b, skipped), (ref, ref_skipped) in zip(got, plain):
            assert skipped == ref_skipped
            torch.testing.assert_close(b[0], ref[0], rtol=0, atol=0)
            assert b[2].tolist() == ref[2].tolist()
    seen, counted = [], []

    class Task:
        def advance(self, n):
            counted.append(n)

    for _, _, idx in readable_batches(PrefetchLoader(ds, 4, 2), Task()):
        seen.extend(idx.tolist())
    assert seen == [i for i in range(11) if i != 5]  # the unreadable one skipped ...
    assert sum(counted) == 11  # ... and counted


def test_strict_stops_at_the_first_unreadable_image(folder_with_a_bad_file):
    ds = ImageDataset(folder_with_a_bad_file, transform=eval_transform(32, 32), strict=True)
    batches = []
    with pytest.raises(DataError, match="05.png"):
        for batch in PrefetchLoader(ds, 4, 2):
            batches.append(batch)
    assert len(batches) == 1  # the batch before the bad image came through


class Counting(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n, self.started, self.lock = n, 0, threading.Lock()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        with self.lock:
            self.started += 1
        return torch.tensor([i]), -1, i


def test_items_made_ahead_stay_within_two_batches_whatever_the_folder_size():
    ds = Counting(1000)
    for k, (batch, _) in enumerate(PrefetchLoader(ds, 8, 3)):
        assert ds.started <= 8 * (k + 1) + 2 * 8
        assert batch[2].tolist() == list(range(8 * k, 8 * k + len(batch[2])))
        if k == 20:
            break
    made = ds.started
    assert made <= 8 * 21 + 16
    time.sleep(0.2)
    assert ds.started == made  # stopping early leaves no work queued behind it


def test_prefetch_map_keeps_order_and_raises_an_items_error_in_its_place():
    def f(x):
        if x == 7:
            raise ValueError("seven")
        return x * x

    it = prefetch_map(f, range(10), threads=3, ahead=4)
    assert [next(it) for _ in range(7)] == [x * x for x in range(7)]
    with pytest.raises(ValueError, match="seven"):
        next(it)


def test_image_loader_uses_workers_when_given_and_threads_otherwise(folder_with_a_bad_file):
    ds = ImageDataset(folder_with_a_bad_file, transform=eval_transform(32, 32), strict=False)
    assert isinstance(image_loader(ds, 4, num_workers=0, threads=2), PrefetchLoader)
    assert isinstance(image_loader(ds, 4, num_workers=1), torch.utils.data.DataLoader)
    assert isinstance(image_loader(ds, 4, num_workers=0, threads=0), torch.utils.data.DataLoader)
    assert decode_threads(2, 2) == 1 and decode_threads(1, 2) == 1 and decode_threads(2, 8) == 4


def test_a_jpeg_with_exif_orientation_6_embeds_like_the_same_image_rotated(tmp_path):
    """A phone portrait (landscape pixels, EXIF 6) embeds exactly as the upright picture stored plainly."""
    rng = np.random.default_rng(0)
    stored = Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    (tmp_path / "phone").mkdir()
    (tmp_path / "plain").mkdir()
    stored.save(tmp_path / "phone" / "p.jpg", quality=95, exif=exif.tobytes())
    with Image.open(tmp_path / "phone" / "p.jpg") as im:  # the decoded pixels, turned upright by hand
        im.convert("RGB").transpose(Image.Transpose.ROTATE_270).save(tmp_path / "plain" / "p.png")
    model = tiny_vit()
    t = eval_transform(32, 32)
    phone = compute_features(model, tmp_path / "phone", transform=t)
    plain = compute_features(model, tmp_path / "plain", transform=t)
    torch.testing.assert_close(phone.features, plain.features)
    as_stored = torch.stack([t(stored.convert("RGB"))])  # what ignoring the orientation would embed
    assert not torch.allclose(model(as_stored), phone.features, atol=1e-3)


def test_decode_ahead_gives_the_pretraining_batches_of_the_dataloader_bit_for_bit(tmp_path):
    """The multi-crop set read in threads and augmented in this thread: the same crops, skips and
    order as torch's DataLoader, with a random draw of the main thread in between (drop path's)
    neither disturbing nor disturbed."""
    from dinokit.data.loader import DecodeAheadLoader
    from dinokit.data.multicrop import MultiCropAugmentation, MultiCropDataset, collate_multicrop

    paths = [make_image(tmp_path / f"{i:02d}.png", (48 + i, 40), seed=i) for i in range(9)]
    (tmp_path / "03.png").write_bytes(b"broken")
    ds = MultiCropDataset(
        paths, MultiCropAugmentation(local_crops_number=2, global_size=32, local_size=16), seed=5
    )
    ds.set_epoch(2)
    order = [4, 3, 0, 8, 1, 7, 2, 6]

    def batches(loader):
        torch.manual_seed(0)
        out = []
        for crops, skipped in loader:
            out.append(([c.clone() for c in crops], skipped, torch.rand(3)))  # the step's own draw
        return out

    ref = batches(
        torch.utils.data.DataLoader(
            ds,
            batch_size=3,
            sampler=order,
            drop_last=True,
            collate_fn=collate_multicrop,
            generator=torch.Generator().manual_seed(1),
        )
    )  # as pretrain does
    got = batches(DecodeAheadLoader(ds, order, 3, threads=3, collate_fn=collate_multicrop))
    assert len(got) == len(ref) == 2
    for (c, s, r), (c0, s0, r0) in zip(got, ref):
        assert s == s0
        assert torch.equal(r, r0)
        for a, b in zip(c, c0):
            assert torch.equal(a, b)
    assert ref[0][1] == (3,)  # the broken file was skipped (and reported) in the first batch
