"""The mask vocabulary: semantics drawn as small matrices, metadata, constructors, immutability."""
import pickle

import pytest
import torch

from attnlib.masks import BlockDiagonal, Causal, DenseMask, KeyPadding


def rows(t):
    return [[int(x) for x in r] for r in t.tolist()]


def test_causal_is_bottom_right_by_default_like_a_kv_cache():
    # Sq=2, Sk=5: the last query sees every key, the first all but the newest
    assert rows(Causal().materialize(2, 5)) == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_causal_top_left_matches_torch_is_causal():
    assert rows(Causal(align="top_left").materialize(2, 5)) == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0]]


def test_causal_window_keeps_the_w_newest_visible_keys_including_the_diagonal():
    assert rows(Causal(window=2).materialize(3, 5)) == [[0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]]


def test_bottom_right_with_more_queries_than_keys_leaves_leading_rows_empty():
    assert rows(Causal().materialize(3, 2)) == [[0, 0], [1, 0], [1, 1]]


def test_block_diagonal_blocks_do_not_see_each_other_and_causal_is_per_block_bottom_right():
    m = BlockDiagonal([1, 2], [3, 2], causal=True)
    assert rows(m.materialize()) == [
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 1, 1],
    ]


def test_block_diagonal_metadata_is_computed_once_as_int32_and_python_ints():
    m = BlockDiagonal.from_seqlens([3, 0, 5], [4, 2, 5])
    assert m.cu_seqlens_q.dtype == torch.int32 and m.cu_seqlens_q.tolist() == [0, 3, 3, 8]
    assert m.cu_seqlens_k.tolist() == [0, 4, 6, 11]
    assert (m.max_seqlen_q, m.max_seqlen_k) == (5, 5) and isinstance(m.max_seqlen_q, int)
    assert m.cu_seqlens_q_on("cpu") is m.cu_seqlens_q_on("cpu")


def test_block_diagonal_constructors_agree():
    a = BlockDiagonal.from_seqlens([2, 3, 1])
    assert BlockDiagonal.from_cu_seqlens(torch.tensor([0, 2, 5, 6])) == a
    assert BlockDiagonal.from_cu_seqlens([0, 2, 5, 6]) == a
    assert BlockDiagonal.from_segment_ids([7, 7, 3, 3, 3, 9]) == a
    assert hash(BlockDiagonal([2, 3, 1])) == hash(a)
    assert BlockDiagonal([2, 3, 1], causal=True) != a


def test_block_diagonal_split_and_merge_round_trip():
    m = BlockDiagonal([2, 3], [1, 4])
    x = torch.arange(5.0)
    parts = m.split(x)
    assert [p.tolist() for p in parts] == [[0.0, 1.0], [2.0, 3.0, 4.0]]
    assert torch.equal(m.merge(parts), x)
    assert [p.tolist() for p in m.split(x, kv=True)] == [[0.0], [1.0, 2.0, 3.0, 4.0]]
    with pytest.raises(ValueError, match="q_seqlens sum to 5"):
        m.split(torch.arange(4.0))


@pytest.mark.parametrize("bad,match", [
    (lambda: BlockDiagonal.from_cu_seqlens([0, 3, 2]), "non-decreasing"),
    (lambda: BlockDiagonal.from_cu_seqlens([1, 3]), "start at 0"),
    (lambda: BlockDiagonal([2, -1]), ">= 0"),
    (lambda: BlockDiagonal([2, 3], [1]), "one key length per query block"),
    (lambda: BlockDiagonal([]), "at least one block"),
    (lambda: BlockDiagonal([2], window=3), "needs causal=True"),
    (lambda: BlockDiagonal.from_segment_ids([0, 0, 1, 0]), "two separate runs"),
    (lambda: Causal(align="bottom-left"), "align"),
    (lambda: Causal(window=0), ">= 1"),
    (lambda: KeyPadding(torch.ones(2, 3)), "bool"),
    (lambda: KeyPadding(torch.ones(3, dtype=torch.bool)), r"\[B, Sk\]"),
    (lambda: DenseMask(torch.ones(2, 3, dtype=torch.int64)), "bool"),
])
def test_malformed_masks_raise_clear_errors(bad, match):
    with pytest.raises((ValueError, TypeError), match=match):
        bad()


def test_masks_are_immutable_and_picklable():
    m = BlockDiagonal([2, 3], causal=True)
    with pytest.raises(AttributeError):
        m.causal = False
    with pytest.raises(Exception):
        Causal().window = 3
    assert pickle.loads(pickle.dumps(m)) == m
    assert {Causal(), Causal()} == {Causal()}


def test_key_padding_and_dense_materialize_broadcastable_bool():
    valid = torch.tensor([[True, False, True]])
    assert KeyPadding(valid).materialize(2, 3).shape == (1, 1, 2, 3)
    bias = torch.tensor([[0.0, float("-inf")]])
    assert rows(DenseMask(bias).materialize(1, 2)) == [[1, 0]]
