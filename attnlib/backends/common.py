"""Small tensor helpers shared by backends (no backend imports another backend)."""
from __future__ import annotations

import torch

from ..caching import host_lru
from ..inputs import AttentionCall
from ..plan import Modifiers, Plan, Tile

#: the score of a hidden key
NEG_INF = float("-inf")


def repeat_kv(x: torch.Tensor, ratio: int, head_dim: int = -2) -> torch.Tensor:
    """Expand kv heads for GQA: head ``h`` of the result is kv head ``h // ratio``."""
    if ratio == 1:
        return x
    return x.repeat_interleave(ratio, dim=head_dim)


def strided_run(q, k, v, q0: int, k0: int, n: int, step: int, tile: Tile):
    """The BSHD tensors of a run of ``n`` equal tiles (``Plan.runs``) as batches of ``B * n`` sequences:
    queries ``q[:, q0 + m * q_len : ...]`` and keys ``k[:, k0 + m * step : ... + k_len]``, ``m < n`` (strided
    views; overlapping key windows share memory). Views when ``B == 1`` or ``n == 1``."""
    b = q.shape[0]
    lq, lk = tile.q_len, tile.k_len
    qg = q.narrow(1, q0, n * lq).reshape(b * n, lq, *q.shape[2:])

    def keys(x):
        if n == 1:
            return x.narrow(1, k0, lk)
        # windows of lk keys every `step` keys: [B, n, H, D, lk] -> [B, n, lk, H, D] (no storage offsets read:
        # compiled code traces this as views)
        view = x.narrow(1, k0, (n - 1) * step + lk).unfold(1, lk, step).movedim(-1, 2)
        return view.reshape(b * n, lk, *x.shape[2:])
    return qg, keys(k), keys(v)


def assemble_rows(pieces, call: AttentionCall):
    """``(out BSHD, lse or None)`` of the whole call from ``(q_start, out, lse)`` pieces sorted by query row
    and disjoint; rows in no piece get 0 / -inf."""
    b, sq, hq, dv = call.batch, call.seqlen_q, call.heads_q, call.head_dim_v
    outs, lses, pos = [], [], 0
    like = call.q

    def gap(n):
        outs.append(like.new_zeros(b, n, hq, dv))
        if call.return_lse:
            lses.append(torch.full((b, hq, n), NEG_INF, device=like.device))

    for q0, out, lse in pieces:
        if q0 > pos:
            gap(q0 - pos)
        outs.append(out)
        if call.return_lse:
            lses.append(lse)
        pos = q0 + out.shape[1]
    if pos < sq or not outs:
        gap(sq - pos)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    lse = None
    if call.return_lse:
        lse = lses[0] if len(lses) == 1 else torch.cat(lses, -1)
    return out, lse


@host_lru(1024)
def tile_plan(tile: Tile) -> Plan:
    """The plan of one tile on its own (``q_len`` x ``k_len``, at the origin)."""
    return Plan(tile.q_len, tile.k_len, (Tile(0, tile.q_len, 0, tile.k_len, tile.causal, tile.offset, tile.window),))


def run_tiles(call: AttentionCall, run_one):
    """A structured plan of several tiles with one key run per row, run as one batched sub-call per run of
    equal tiles (:meth:`attnlib.plan.Plan.runs`, strided views) through ``run_one(sub_call) -> (out, lse)``;
    the rows are assembled in order (rows in no tile: 0 / -inf). Each sub-call's plan is its tile at the
    origin, with the call's modifiers (ALiBi slopes per batch repeated for the run)."""
    q, k, v, plan = call.q, call.k, call.v, call.plan
    b = q.shape[0]
    pieces = []
    for q0, k0, n, step, tile in plan.runs():
        if tile.q_len == 0:
            continue
        qg, kg, vg = strided_run(q, k, v, q0, k0, n, step, tile)
        sub = tile_plan(tile)
        mods = plan.mods
        if mods.any:
            alibi = mods.alibi
            if alibi is not None and alibi.dim() == 2 and n > 1:
                alibi = alibi.repeat_interleave(n, 0)
            sub = sub.with_call(Modifiers(mods.softcap, alibi, mods.sinks))
        part = call.replace(q=qg, k=kg, v=vg, plan=sub, batch=b * n, seqlen_q=tile.q_len, seqlen_k=tile.k_len)
        out, lse = run_one(part)
        out = out.reshape(b, n * tile.q_len, *out.shape[2:])
        if lse is not None:
            lse = lse.reshape(b, n, lse.shape[1], tile.q_len).transpose(1, 2).reshape(b, lse.shape[1], -1)
        pieces.append((q0, out, lse))
    return assemble_rows(pieces, call)
