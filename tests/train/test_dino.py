"""The DINO training state and step on tensors: one update, EMA teacher, frozen last layer, collapse."""

from __future__ import annotations

import math

import torch

from dinokit.train.dino import build_training_state, dino_step
from dinokit.train.pretrain import is_collapsed
from dinokit.train.pretrain_settings import PretrainConfig


def tiny_state(**kw):
    cfg = PretrainConfig(
        arch="vit_tiny",
        depth=1,
        out_dim=16,
        local_crops=1,
        global_size=32,
        local_size=16,
        global_scale=(0.4, 1.0),
        momentum_teacher=0.9,
        warmup_epochs=0,
        epochs=2,
        **kw,
    )
    return build_training_state(cfg, torch.device("cpu"), None)


def crops(batch=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, 32, 32, generator=g) for _ in range(2)] + [
        torch.randn(batch, 3, 16, 16, generator=g)
    ]


def test_one_step_updates_the_student_and_moves_the_teacher_by_ema():
    state = tiny_state()
    teacher0 = {k: v.clone() for k, v in state.teacher.state_dict().items()}
    student0 = {k: v.clone() for k, v in state.student.state_dict().items()}
    loss = dino_step(state, crops(), epoch=0, values={"lr": 1e-3, "wd": 0.04, "momentum": 0.9})
    assert loss.ndim == 0 and torch.isfinite(loss) and not loss.requires_grad
    student1 = state.student.state_dict()
    name = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(student0[name], student1[name])
    # the teacher is 0.9 of itself plus 0.1 of the updated student
    expected = 0.9 * teacher0[name] + 0.1 * student1[name]
    assert torch.allclose(state.teacher.state_dict()[name], expected, atol=1e-7)
    # during the first epoch (freeze_last_layer=1) the head's last layer does not learn
    last = [k for k in student0 if "last_layer" in k]
    assert last and all(torch.equal(student0[k], student1[k]) for k in last)
    assert state.optimizer.param_groups[0]["weight_decay"] == 0.04
    assert all(g["lr"] == 1e-3 for g in state.optimizer.param_groups)


def test_state_dict_round_trip():
    a, b = tiny_state(), tiny_state(seed=1)
    dino_step(a, crops(), epoch=1, values={"lr": 1e-3, "wd": 0.04, "momentum": 0.9})
    b.load_state_dict(a.state_dict())
    for k, v in a.student.state_dict().items():
        assert torch.equal(v, b.student.state_dict()[k]), k
    assert torch.equal(a.dino_loss.center, b.dino_loss.center)
    assert a.optimizer.state_dict()["state"].keys() == b.optimizer.state_dict()["state"].keys()


def test_collapse_is_a_whole_epoch_at_ln_out_dim():
    ln = math.log(256)
    assert is_collapsed(torch.full((4,), ln), 256)
    assert is_collapsed(torch.tensor([ln + 0.04, ln - 0.04]), 256)  # within 0.05
    assert not is_collapsed(torch.tensor([ln, ln - 0.5]), 256)
    assert not is_collapsed(torch.tensor([]), 256)


def test_compiled_models_make_a_training_state():
    # a torch.compile wrapper raises on truth-value tests; the state must take it as it is
    state = tiny_state(compile=True)
    assert state.student_forward is not state.student and state.teacher_forward is not state.teacher
    assert state.student_forward._orig_mod is state.student


def test_bf16_weights_cast_once_per_step_are_bitwise_the_autocast_path():
    """The cast-once path (one operator for the backbones' bf16 weights, the teacher's once per EMA
    update) gives exactly autocast's losses and weights, step after step; drop path and the head's
    frozen last layer included."""

    def run(cast_once):
        cfg = PretrainConfig(
            arch="vit_tiny",
            depth=2,
            out_dim=32,
            local_crops=2,
            global_size=32,
            local_size=16,
            global_scale=(0.4, 1.0),
            momentum_teacher=0.9,
            warmup_epochs=0,
            epochs=3,
            drop_path=0.1,
        )
        state = build_training_state(cfg, torch.device("cpu"), torch.bfloat16, cast_once=cast_once)
        assert (state.student_weights is not None) == cast_once
        g = torch.Generator().manual_seed(0)
        losses = []
        for step in range(4):
            batch = [torch.randn(3, 3, 32, 32, generator=g) for _ in range(2)]
            batch += [torch.randn(3, 3, 16, 16, generator=g) for _ in range(2)]
            losses.append(
                dino_step(state, batch, epoch=step // 2, values={"lr": 1e-3, "wd": 0.04, "momentum": 0.9})
            )
        return torch.stack(losses), state

    losses_a, a = run(False)
    losses_b, b = run(True)
    assert torch.equal(losses_a, losses_b), (losses_a, losses_b)
    for name, ref in a.student.state_dict().items():
        assert torch.equal(ref, b.student.state_dict()[name]), name
    for name, ref in a.teacher.state_dict().items():
        assert torch.equal(ref, b.teacher.state_dict()[name]), name
    ref_state, got_state = a.optimizer.state_dict()["state"], b.optimizer.state_dict()["state"]
    for k in ref_state:
        assert torch.equal(ref_state[k]["exp_avg_sq"], got_state[k]["exp_avg_sq"])


def test_the_cast_once_path_really_hands_bf16_weights_to_the_layers():
    """No per-layer weight cast is left for autocast to make (else the test above would compare the
    autocast path with itself)."""
    cfg = PretrainConfig(
        arch="vit_tiny",
        depth=2,
        out_dim=32,
        local_crops=1,
        global_size=32,
        local_size=16,
        global_scale=(0.4, 1.0),
        warmup_epochs=0,
        epochs=2,
    )
    batch = crops()
    for cast_once in (False, True):
        state = build_training_state(cfg, torch.device("cpu"), torch.bfloat16, cast_once=cast_once)
        qkv = tuple(state.student.backbone.blocks[0].attn.qkv.weight.shape)
        with torch.profiler.profile(record_shapes=True) as prof:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                with torch.no_grad():
                    state.forward_teacher(batch[:2])
                state.forward_student(batch)
        casts = sum(
            e.count
            for e in prof.key_averages(group_by_input_shape=True)
            if e.key == "aten::_to_copy" and e.input_shapes and tuple(e.input_shapes[0]) == qkv
        )
        assert casts == (0 if cast_once else 4), casts  # autocast: teacher 2 blocks + student 2 blocks
