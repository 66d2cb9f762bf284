"""Every documented input error is a ValueError/TypeError naming the argument, raised before any kernel."""
import pytest
import torch

import attnlib

from attnlib import Attention, BlockDiagonal, DenseMask, KeyPadding, attention


def qkv(b=2, sq=5, sk=7, hq=4, hkv=2, d=16, dv=None, dtype=torch.float32):
    return (torch.randn(b, sq, hq, d, dtype=dtype), torch.randn(b, sk, hkv, d, dtype=dtype),
            torch.randn(b, sk, hkv, dv or d, dtype=dtype))


@pytest.mark.parametrize("make,exc,match", [
    (lambda: (torch.randn(5, 16), *qkv()[1:]), ValueError, "BSHD"),
    (lambda: (qkv()[0], torch.randn(2, 7, 2, 8), qkv()[2]), ValueError, "head dim of k"),
    (lambda: (qkv()[0], qkv()[1], torch.randn(2, 6, 2, 16)), ValueError, "same sequence length"),
    (lambda: (qkv()[0], torch.randn(3, 7, 2, 16), torch.randn(3, 7, 2, 16)), ValueError, "batch sizes differ"),
    (lambda: qkv(hq=6, hkv=4), ValueError, "multiple of key/value heads"),
    (lambda: (qkv()[0].half(), *qkv()[1:]), TypeError, "share one dtype"),
    (lambda: (qkv()[0].long(), *qkv()[1:]), TypeError, "q must be float16"),
    (lambda: ([1.0], *qkv()[1:]), TypeError, "q must be a torch.Tensor"),
])
def test_shape_rank_dtype_and_gqa_errors_name_the_argument(make, exc, match):
    q, k, v = make()
    with pytest.raises(exc, match=match):
        attention(q, k, v, backend="sdpa")


def test_block_diagonal_seqlens_must_cover_the_packed_tokens():
    q, k, v = (torch.randn(10, 2, 16) for _ in range(3))
    with pytest.raises(ValueError, match="q_seqlens sum to 9 but q has 10"):
        attention(q, k, v, BlockDiagonal([4, 5]))
    with pytest.raises(ValueError, match="kv_seqlens sum to 11 but k/v have 10"):
        attention(q, k, v, BlockDiagonal([4, 6], [5, 6]))


def test_block_diagonal_with_a_real_batch_asks_for_packing():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="packed THD"):
        attention(q, k, v, BlockDiagonal([5]))


def test_block_diagonal_accepts_batch_one_and_keeps_the_batch_dim():
    q, k, v = qkv(b=1, sq=7, sk=7)
    out, lse = attention(q, k, v, BlockDiagonal([3, 4]), return_lse=True)
    assert out.shape == (1, 7, 4, 16) and lse.shape == (1, 4, 7)
    ref = torch.cat([attention(q[:, :3], k[:, :3], v[:, :3]), attention(q[:, 3:], k[:, 3:], v[:, 3:])], dim=1)
    torch.testing.assert_close(out, ref)


def test_key_padding_shape_device_and_layout_errors():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"\[B, Sk\] = \[2, 7\]"):
        attention(q, k, v, KeyPadding(torch.ones(2, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="dense BSHD"):
        attention(q[0], k[0], v[0], KeyPadding(torch.ones(1, 7, dtype=torch.bool)))
    meta = KeyPadding(torch.ones(2, 7, dtype=torch.bool, device="meta"))
    with pytest.raises(ValueError, match="move it with .to"):
        attention(q, k, v, meta)


def test_dense_mask_must_broadcast_and_have_a_sensible_dtype():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="does not broadcast"):
        attention(q, k, v, DenseMask(torch.ones(5, 6, dtype=torch.bool)))
    with pytest.raises(TypeError, match="float DenseMask"):
        attention(q, k, v, DenseMask(torch.zeros(5, 7, dtype=torch.float64)))


def test_raw_tensor_masks_are_rejected_with_the_fix():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"DenseMask\(tensor\)"):
        attention(q, k, v, torch.ones(5, 7, dtype=torch.bool))


def test_scale_must_be_a_number():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="scale"):
        attention(q, k, v, scale="0.1")


def test_attention_module_checks_its_head_config():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="num_heads"):
        Attention(num_heads=6, head_size=16, num_kv_heads=4)
    with pytest.raises(ValueError, match="8 heads"):
        Attention(num_heads=8, head_size=16, num_kv_heads=2)(q, k, v)
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        Attention(num_heads=4, head_size=16, num_kv_heads=4)(q, k, v)
    with pytest.raises(ValueError, match="cannot add causal attention to a DenseMask"):
        Attention(4, 16, 2, causal=True)(q, k, v, DenseMask(torch.ones(7, 7, dtype=torch.bool)))


def test_a_causal_module_makes_key_padding_causal():
    """``Attention(causal=True)`` with ``KeyPadding(valid)`` runs ``KeyPadding(valid, causal=True)``."""
    q, k, v = qkv()
    valid = torch.ones(q.shape[0], k.shape[1], dtype=torch.bool)
    valid[0, :2] = False
    got = Attention(4, 16, 2, causal=True, backend="math")(q, k, v, KeyPadding(valid))
    want = attnlib.attention(q, k, v, KeyPadding(valid, causal=True), backend="math")
    assert torch.equal(got, want)
    assert not torch.equal(got, attnlib.attention(q, k, v, KeyPadding(valid), backend="math"))
