"""The vLLM-Omni-style layer maps the metadata such model code passes onto attnlib masks."""
from types import SimpleNamespace

import pytest
import torch

import attnlib
from attnlib import BlockDiagonal, Causal, DenseMask, KeyPadding
from attnlib.integrations import vllm_omni
from attnlib.integrations.vllm_omni import Attention, AttentionMetadata
from attnlib.testing import assert_close_to_reference, reference_and_naive

BACKENDS = [r["name"] for r in attnlib.list_backends() if r["available"] and r["name"] != "triton"]
H, HKV, D = 4, 2, 16


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def check(out, q, k, v, mask, scale):
    """``out`` against float64 attention of the joined tensors under the exact dense mask."""
    (ref, _), (naive, _) = reference_and_naive(q, k, v, mask, scale, packed=q.dim() == 3)
    assert_close_to_reference(out, ref, naive, q.dtype)


@pytest.mark.parametrize("strategy", ["front", "rear"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_joint_text_tensors_are_joined_in_order_with_their_mask(backend, strategy):
    B, S, J = 2, 6, 4
    q, k, v = rand(B, S, H, D), rand(B, S, HKV, D, seed=1), rand(B, S, HKV, D, seed=2)
    jq, jk, jv = rand(B, J, H, D, seed=3), rand(B, J, HKV, D, seed=4), rand(B, J, HKV, D, seed=5)
    text_valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]).bool()
    layer = Attention(H, D, causal=False, softmax_scale=0.125, num_kv_heads=HKV, backend=backend, prefix="blocks.0")
    meta = AttentionMetadata(joint_query=jq, joint_key=jk, joint_value=jv, joint_attn_mask=text_valid,
                             joint_strategy=strategy)
    out = layer(q, k, v, meta)
    order = (lambda a, b: torch.cat([b, a], 1)) if strategy == "front" else (lambda a, b: torch.cat([a, b], 1))
    valid = order(torch.ones(B, S, dtype=torch.bool), text_valid)
    assert out.shape == (B, S + J, H, D)
    assert isinstance(layer.last_translation.mask, KeyPadding) and torch.equal(layer.last_translation.mask.valid, valid)
    check(out, order(q, jq), order(k, jk), order(v, jv), KeyPadding(valid), 0.125)


@pytest.mark.parametrize("backend", BACKENDS)
def test_2d_padding_mask_true_means_keep(backend):
    q, k, v = rand(2, 5, H, D), rand(2, 5, HKV, D, seed=1), rand(2, 5, HKV, D, seed=2)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])  # 0/1 ints, as model code passes
    layer = Attention(H, D, False, None, num_kv_heads=HKV, backend=backend)
    out = layer(q, k, v, AttentionMetadata(attn_mask=keep))
    check(out, q, k, v, KeyPadding(keep.bool()), D ** -0.5)
    layer(q, k, v, AttentionMetadata(attn_mask=torch.ones(2, 5, dtype=torch.bool)))
    assert layer.last_translation.kind == "none"  # nothing padded: no mask at all


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_with_a_padding_mask_is_causal_key_padding(backend):
    q, k, v = rand(2, 6, H, D), rand(2, 6, HKV, D, seed=1), rand(2, 6, HKV, D, seed=2)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool()      # left and right padding
    layer = Attention(H, D, True, None, num_kv_heads=HKV, backend=backend)
    out = layer(q, k, v, AttentionMetadata(attn_mask=keep))
    mask = layer.last_translation.mask
    assert layer.last_translation.kind == "key_padding" and isinstance(mask, KeyPadding) and mask.causal
    assert torch.equal(mask.valid, keep)
    dense = DenseMask((Causal().materialize(6, 6)[None] & keep[:, None, :])[:, None])
    check(out, q, k, v, dense, D ** -0.5)


@pytest.mark.parametrize("sq,sk", [(6, 6), (3, 8)])
def test_causal_with_a_padding_mask_reads_nothing_back_to_the_host_and_matches_math(monkeypatch, sq, sk):
    q, k, v = rand(2, sq, H, D), rand(2, sk, HKV, D, seed=1), rand(2, sk, HKV, D, seed=2)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1, 0, 1, 1, 1, 0, 0, 0]])[:, :sk]      # 0/1 ints
    dense = DenseMask((Causal().materialize(sq, sk)[None] & keep.bool()[:, None, :])[:, None])
    want = attnlib.attention(q, k, v, dense, backend="math")

    def host_read(*a, **kw):
        raise AssertionError("a host read of a tensor")

    for name in ("__bool__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    out = Attention(H, D, True, None, num_kv_heads=HKV, backend="sdpa")(q, k, v, AttentionMetadata(attn_mask=keep))
    monkeypatch.undo()
    assert torch.allclose(out, want, atol=1e-5)


def _count_translations(monkeypatch):
    counts = {"translate_metadata": 0, "translate_dense": 0}
    for name in counts:
        real = getattr(vllm_omni, name)

        def counted(*a, _real=real, _name=name, **kw):
            counts[_name] += 1
            return _real(*a, **kw)

        monkeypatch.setattr(vllm_omni, name, counted)
    return counts


def test_every_layer_after_the_first_reuses_the_translation_of_the_same_metadata(monkeypatch):
    counts = _count_translations(monkeypatch)
    B, S, J = 2, 6, 3
    q, k, v = rand(B, S, H, D), rand(B, S, HKV, D, seed=1), rand(B, S, HKV, D, seed=2)
    jq, jk, jv = rand(B, J, H, D, seed=3), rand(B, J, HKV, D, seed=4), rand(B, J, HKV, D, seed=5)
    padded = torch.tensor([[1] * S, [0, 1, 1, 1, 1, 1]]).bool()
    four_d = Causal().materialize(S, S)[None, None] & padded[:, None, None]
    metas = [AttentionMetadata(attn_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * S])),
             AttentionMetadata(attn_mask=four_d),
             AttentionMetadata(joint_query=jq, joint_key=jk, joint_value=jv,
                               joint_attn_mask=torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()),
             {"attn_mask": torch.tensor([[1, 0, 1, 1, 1, 1], [1] * S]).bool()}]        # a dict: no weak reference
    for causal in (False, True):
        layers = [Attention(H, D, causal, None, num_kv_heads=HKV, backend="sdpa") for _ in range(3)]
        for meta in metas:
            before = dict(counts)
            outs = [layer(q, k, v, meta) for layer in layers]                          # three layers, one translation
            assert counts["translate_metadata"] == before["translate_metadata"] + 1, (causal, meta)
            assert counts["translate_dense"] - before["translate_dense"] <= 1
            assert all(layer.last_translation is layers[0].last_translation for layer in layers)
            assert all(torch.equal(o, outs[0]) for o in outs)
    # packed: cu_seqlens are read once, not once per layer
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    meta = AttentionMetadata(cu_seqlens_q=cu, cu_seqlens_k=cu)
    before = counts["translate_metadata"]
    packed_q, packed_kv = rand(10, H, D), rand(10, HKV, D)
    for _ in range(3):
        Attention(H, D, True, None, num_kv_heads=HKV, backend="sdpa")(packed_q, packed_kv, packed_kv, meta)
    assert counts["translate_metadata"] == before + 1


def test_the_cached_translation_follows_in_place_edits_shapes_and_the_causal_flag(monkeypatch):
    counts = _count_translations(monkeypatch)
    q, k, v = rand(2, 5, H, D), rand(2, 5, HKV, D, seed=1), rand(2, 5, HKV, D, seed=2)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
    meta = AttentionMetadata(attn_mask=keep)
    layer = Attention(H, D, False, None, num_kv_heads=HKV, backend="sdpa")
    layer(q, k, v, meta)
    assert layer.last_translation.kind == "key_padding" and counts["translate_metadata"] == 1
    keep[0] = True                                          # an in-place edit of the mask: translated again
    out = layer(q, k, v, meta)
    assert layer.last_translation.kind == "none" and counts["translate_metadata"] == 2
    check(out, q, k, v, None, D ** -0.5)
    Attention(H, D, True, None, num_kv_heads=HKV, backend="sdpa")(q, k, v, meta)          # another causal flag
    assert counts["translate_metadata"] == 3
    layer(q[:, :3], k, v, meta)                             # another query length
    assert counts["translate_metadata"] == 4
    meta.attn_mask = keep.clone()                           # another tensor in the same metadata object
    layer(q, k, v, meta)
    assert counts["translate_metadata"] == 5


def test_inference_tensors_are_cached_per_metadata_object(monkeypatch):
    counts = _count_translations(monkeypatch)
    q, k, v = rand(2, 5, H, D), rand(2, 5, HKV, D, seed=1), rand(2, 5, HKV, D, seed=2)
    layer = Attention(H, D, True, None, num_kv_heads=HKV, backend="sdpa")
    with torch.inference_mode():
        keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).bool()
        meta = AttentionMetadata(attn_mask=keep)
        layer(q, k, v, meta)
        layer(q, k, v, meta)
        assert counts["translate_metadata"] == 1
        layer(q, k, v, AttentionMetadata(attn_mask=keep))    # a new metadata object: translated again
        assert counts["translate_metadata"] == 2
        layer(q, k, v, {"attn_mask": keep})                  # no weak reference, no version counter: not cached
        layer(q, k, v, {"attn_mask": keep})
        assert counts["translate_metadata"] == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_layer_is_bottom_right_against_a_longer_kv(backend):
    """vLLM-Omni's SDPA backend would pass torch's top-left is_causal here; the newest query must see all keys."""
    q, k, v = rand(1, 2, H, D), rand(1, 7, HKV, D, seed=1), rand(1, 7, HKV, D, seed=2)
    out = Attention(H, D, True, None, num_kv_heads=HKV, backend=backend)(q, k, v)
    check(out, q, k, v, Causal(), D ** -0.5)
    check(out[:, 1:], q[:, 1:], k, v, None, D ** -0.5)  # the last query sees every key


@pytest.mark.parametrize("where", ["fields", "extra", "vllm_omni_object"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_run_packed_sequences_as_block_diagonal(backend, where):
    cu = torch.tensor([0, 3, 8, 10], dtype=torch.int32)
    q, k, v = rand(10, H, D), rand(10, HKV, D, seed=1), rand(10, HKV, D, seed=2)
    if where == "fields":
        meta = AttentionMetadata(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
    elif where == "extra":
        meta = AttentionMetadata(extra={"cu_seqlens_q": cu, "cu_seqlens_k": cu, "max_seqlen_q": 5})
    else:  # duck-typed: vLLM-Omni's own metadata class keeps them in .extra
        meta = SimpleNamespace(attn_mask=None, joint_query=None, joint_key=None, joint_value=None,
                               extra={"cu_seqlens_q": cu, "cu_seqlens_k": cu})
    layer = Attention(H, D, True, None, num_kv_heads=HKV, backend=backend)
    out = layer(q, k, v, meta)
    assert layer.last_translation.mask == BlockDiagonal([3, 5, 2], causal=True)
    check(out, q, k, v, BlockDiagonal([3, 5, 2], causal=True), D ** -0.5)
    batched = layer(q[None], k[None], v[None], meta)  # [1, T, H, D] works too
    assert torch.equal(batched[0], out)


def test_bad_metadata_raises_naming_the_field():
    q, k, v = rand(1, 4, H, D), rand(1, 4, H, D, seed=1), rand(1, 4, H, D, seed=2)
    layer = Attention(H, D, False, None)
    with pytest.raises(ValueError, match="joint_query, joint_key and joint_value"):
        layer(q, k, v, AttentionMetadata(joint_query=q))
    with pytest.raises(ValueError, match="joint_strategy"):
        layer(q, k, v, AttentionMetadata(joint_query=q, joint_key=k, joint_value=v, joint_strategy="middle"))
    with pytest.raises(ValueError, match="attn_mask must be"):
        layer(q, k, v, AttentionMetadata(attn_mask=torch.ones(1, 9, dtype=torch.bool)))
    with pytest.raises(NotImplementedError, match="cu_seqlens"):
        layer(q, k, v, AttentionMetadata(attn_mask=torch.ones(1, 4), cu_seqlens_q=torch.tensor([0, 4])))
    with pytest.raises(ValueError, match="query heads"):
        Attention(2, D, False, None)(q, k, v)
    with pytest.raises(ValueError, match="ring_degree"):
        Attention(H, D, False, None, ring_degree=0)
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        with pytest.raises(RuntimeError, match="init_process_group"):      # degrees need a process group
            Attention(H, D, False, None, ring_degree=2)(q, k, v)
    with pytest.raises(NotImplementedError, match="custom_attention"):
        Attention(H, D, False, None, custom_attention=torch.nn.Identity())
