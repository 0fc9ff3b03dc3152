"""The attention kernels against einsum and fp64: the attention matrix and its CLS row, the fused
(SDPA) path, the blocked path across block edges, and the bf16 CPU kernel with its gradients."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from dinokit.models import VisionTransformer
from tests.helpers import tiny_vit


# -- attention -------------------------------------------------------------------------------------
def _last_block_input(m: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    t = m.prepare_tokens(x)
    for blk in m.blocks[:-1]:
        t = blk(t)
    return m.blocks[-1].norm1(t)


def test_last_selfattention_matches_einsum_and_rows_sum_to_one():
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        attn = m.get_last_selfattention(x)
        h = _last_block_input(m, x)
        a = m.blocks[-1].attn
        q, k, _ = (h @ a.qkv.weight.T + a.qkv.bias).chunk(3, dim=-1)
        q = q.reshape(2, -1, a.num_heads, a.head_dim)
        k = k.reshape(2, -1, a.num_heads, a.head_dim)
        logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(a.head_dim)
        expected = torch.softmax(logits, dim=-1)
    n = 1 + 3 * 4
    assert attn.shape == (2, 3, n, n)
    assert torch.allclose(attn.sum(-1), torch.ones(2, 3, n), atol=1e-5)
    assert torch.allclose(attn, expected, atol=1e-6)


def test_cls_attention_is_row_zero_patch_part_of_the_full_matrix():
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        full = m.get_last_selfattention(x)
        cls = m.get_cls_attention(x)
    assert cls.shape == (2, 3, 12)
    assert torch.allclose(cls, full[:, :, 0, 1:], atol=1e-6)


def test_fused_attention_equals_the_explicit_path():
    m = tiny_vit(depth=2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fused = m.forward_features(x)
        m.set_fused_attention(False)
        explicit = m.forward_features(x)
    assert all(not b.attn.fused_attn for b in m.blocks)
    assert torch.allclose(fused, explicit, atol=1e-5)


def test_fused_path_calls_sdpa_and_attention_weights_do_not(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    m = tiny_vit(depth=2)
    with torch.no_grad():
        m(torch.randn(1, 3, 32, 32))
        assert len(calls) == 2
        m.get_last_selfattention(torch.randn(1, 3, 32, 32))
        assert len(calls) == 3  # the first block only; the last one returns explicit weights


def test_blocked_attention_equals_sdpa_across_block_edges():
    from dinokit.models.attention import blocked_attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 300, 16, dtype=torch.float64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    # a block smaller than a head: 6 heads x row chunks of 256 + 44 rows
    assert torch.allclose(blocked_attention(q, k, v, block=256 * 300), ref, atol=1e-12)
    # whole heads, 4 to a block: 4 + 2
    assert torch.allclose(blocked_attention(q, k, v, block=4 * 300 * 300 + 5), ref, atol=1e-12)
    assert torch.allclose(blocked_attention(q, k, v), ref, atol=1e-12)  # all heads in one block


def test_bf16_cpu_attention_matches_fp32_and_its_gradients_flow():
    from dinokit.models.attention import attention

    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 3, 197, 64) for _ in range(3))
    ref = F.scaled_dot_product_attention(q, k, v)
    qb, kb, vb = (t.bfloat16().requires_grad_() for t in (q, k, v))
    with torch.no_grad():
        blocked = attention(qb, kb, vb).float()
    explicit = attention(qb, kb, vb)
    for out in (blocked, explicit.float()):
        assert ((out - ref).norm() / ref.norm()) < 2e-2  # bf16 rounding, not a different function
    explicit.float().square().sum().backward()
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    F.scaled_dot_product_attention(q, k, v).square().sum().backward()
    for a, b in ((qb, q), (kb, k), (vb, v)):
        assert ((a.grad.float() - b.grad).norm() / b.grad.norm()) < 3e-2


def test_bf16_cpu_attention_is_as_close_to_fp64_as_the_fused_kernel_on_sharp_logits():
    # logits of std ~9: rounding plain bf16 products would cost ~6x the fused kernel's error
    from dinokit.models.attention import attention

    torch.manual_seed(0)
    qb, kb, vb = ((torch.randn(2, 3, 300, 64) * s).bfloat16() for s in (3.0, 3.0, 1.0))
    ref = F.scaled_dot_product_attention(qb.double(), kb.double(), vb.double())  # the same inputs, exactly

    def err(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    fused = err(F.scaled_dot_product_attention(qb, kb, vb))
    with torch.no_grad():
        blocked = err(attention(qb, kb, vb))
    explicit = err(attention(*(t.clone().requires_grad_() for t in (qb, kb, vb))).detach())
    assert blocked < 2 * fused and explicit < 2 * fused, (blocked, explicit, fused)
