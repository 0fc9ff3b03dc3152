"""Pretraining through the library on 32 tiny images: a non-finite loss stops the run and keeps the
last good checkpoint."""

from __future__ import annotations

import pytest
import torch

import dinokit
from dinokit.train.pretrain import pretrain
from tests.helpers import load_state, tiny_pretrain_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(pretrain_images, tmp_path, monkeypatch):
    import dinokit.train.dino as mod

    class ExplodingLoss(mod.DINOLoss):
        def forward(self, student_output, teacher_output, epoch):
            loss = super().forward(student_output, teacher_output, epoch)
            return loss * float("nan") if epoch == 1 else loss

    monkeypatch.setattr(mod, "DINOLoss", ExplodingLoss)
    out = tmp_path / "nan"
    with pytest.raises(dinokit.DinokitError, match="last good state"):
        pretrain(tiny_pretrain_config(pretrain_images, out))
    ckpt = load_state(out / "checkpoint.pth")
    assert (ckpt["epoch"], ckpt["iteration"]) == (1, 0)
    assert torch.isfinite(torch.cat([v.flatten() for v in ckpt["teacher"].values()])).all()
