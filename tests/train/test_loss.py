"""DINOLoss against the spec's formula written out pair by pair, as an independent reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dinokit.train.loss import DINOLoss, teacher_temperature_schedule


def reference_loss(student, teacher, center, ncrops, temp, student_temp=0.1):
    """The spec's loss, one (teacher global, student crop) pair at a time."""
    batch = teacher.shape[0] // 2
    s_chunks = [student[c * batch : (c + 1) * batch] for c in range(ncrops)]
    t_chunks = [teacher[c * batch : (c + 1) * batch] for c in range(2)]
    total, pairs = 0.0, 0
    for iq in range(2):
        q = torch.softmax((t_chunks[iq] - center) / temp, dim=-1).detach()
        for v in range(ncrops):
            if v == iq:
                continue
            log_p = torch.log_softmax(s_chunks[v] / student_temp, dim=-1)
            per_image = torch.stack([-(q[b] * log_p[b]).sum() for b in range(batch)])
            total = total + per_image.mean()
            pairs += 1
    return total / pairs, pairs


def make_loss(out_dim=32, ncrops=5, warm=0.04, final=0.07, w=3, nepochs=10):
    return DINOLoss(out_dim, ncrops, warm, final, w, nepochs, student_temp=0.1, center_momentum=0.9)


@pytest.mark.parametrize("ncrops,epoch", [(2, 0), (5, 1), (10, 7)])
def test_loss_matches_pairwise_formula(ncrops, epoch):
    torch.manual_seed(ncrops)
    out_dim, batch = 32, 3
    loss_fn = make_loss(out_dim, ncrops)
    loss_fn.center.copy_(torch.randn(1, out_dim) * 0.3)  # a non-zero centre must be subtracted
    student = torch.randn(ncrops * batch, out_dim, dtype=torch.float64).float().requires_grad_()
    teacher = torch.randn(2 * batch, out_dim).requires_grad_()
    temp = float(np.concatenate((np.linspace(0.04, 0.07, 3), np.ones(7) * 0.07))[epoch])

    s_ref = student.detach().clone().requires_grad_()
    expected, pairs = reference_loss(s_ref, teacher.detach(), loss_fn.center.clone(), ncrops, temp)
    got = loss_fn(student, teacher, epoch)
    assert pairs == 2 * (ncrops - 1) == loss_fn.n_pairs
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    got.backward()
    expected.backward()
    torch.testing.assert_close(student.grad, s_ref.grad, rtol=1e-4, atol=1e-6)
    assert teacher.grad is None  # only the student gets gradients


def test_eighteen_pairs_for_two_plus_eight_crops():
    assert make_loss(ncrops=10).n_pairs == 18


def test_centre_updates_after_the_loss_with_the_old_centre_used():
    torch.manual_seed(0)
    out_dim, batch, ncrops = 16, 4, 4
    loss_fn = make_loss(out_dim, ncrops, w=0)
    old = torch.randn(1, out_dim)
    loss_fn.center.copy_(old)
    student = torch.randn(ncrops * batch, out_dim)
    teacher = torch.randn(2 * batch, out_dim)
    got = loss_fn(student, teacher, 0)
    expected, _ = reference_loss(student, teacher, old, ncrops, 0.07)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # center = 0.9 * old + 0.1 * mean over the batch of both globals' raw teacher outputs
    torch.testing.assert_close(loss_fn.center, 0.9 * old + 0.1 * teacher.mean(dim=0, keepdim=True))
    # a second call uses the updated centre
    new_center = loss_fn.center.clone()
    got2 = loss_fn(student, teacher, 0)
    expected2, _ = reference_loss(student, teacher, new_center, ncrops, 0.07)
    torch.testing.assert_close(got2, expected2, rtol=1e-5, atol=1e-5)


def test_uniform_outputs_give_ln_out_dim():
    """The collapse value the CLI warns about: uniform teacher and student give exactly ln(K)."""
    out_dim, batch, ncrops = 64, 2, 3
    loss_fn = make_loss(out_dim, ncrops)
    got = loss_fn(torch.zeros(ncrops * batch, out_dim), torch.zeros(2 * batch, out_dim), 0)
    assert got.item() == pytest.approx(math.log(out_dim), rel=1e-6)


def test_log_softmax_once_per_crop(monkeypatch):
    import dinokit.train.loss as mod

    calls = []
    real = mod.F.log_softmax

    def counting(x, *a, **k):
        calls.append(x.shape[0])
        return real(x, *a, **k)

    monkeypatch.setattr(mod.F, "log_softmax", counting)
    ncrops, batch = 10, 2
    make_loss(8, ncrops)(torch.randn(ncrops * batch, 8), torch.randn(2 * batch, 8), 0)
    # one call over all crops' rows: each row (crop x image) is normalised once, not once per pair
    assert sum(calls) == ncrops * batch


def test_bf16_inputs_are_computed_in_float32():
    torch.manual_seed(1)
    loss_fn = make_loss(32, 4)
    s, t = torch.randn(12, 32), torch.randn(6, 32)
    a = loss_fn(s.bfloat16(), t.bfloat16(), 0)
    b, _ = reference_loss(s.bfloat16().float(), t.bfloat16().float(), torch.zeros(1, 32), 4, 0.04)
    assert a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_teacher_temperature_schedule_per_epoch():
    sched = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(sched) == 100
    assert sched[0] == pytest.approx(0.04)
    assert sched[29] == pytest.approx(0.07)  # reaches teacher_temp at epoch W-1
    assert sched[15] == pytest.approx(0.04 + 15 * 0.03 / 29)
    assert np.all(sched[30:] == 0.07)
    assert np.all(teacher_temperature_schedule(0.04, 0.04, 0, 5) == 0.04)


def test_wrong_row_count_is_refused():
    with pytest.raises(ValueError):
        make_loss(8, 4)(torch.randn(10, 8), torch.randn(4, 8), 0)
