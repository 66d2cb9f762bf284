"""``SequenceParallel``: one attention call over a sequence split across the ranks of a process group.

Only :meth:`SequenceParallel.shard` and :meth:`SequenceParallel.gather` know the layout; the attention
call takes each rank's shards and a mask that describes the *whole* sequence, and returns this rank's
shard of the output (and of the LSE).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from . import comm
from .layout import LAYOUTS, inverse_order, layout_order, rank_ranges, total_from_sizes

__all__ = ["SequenceParallel"]


class SequenceParallel:
    """Sequence parallelism over a process group (default: the default group).

    ``ulysses``: the all-to-all degree (sequence <-> heads); ``ring``: the ring degree;
    ``ulysses * ring`` must equal the group's size. With neither given, ``ulysses`` is the group size.
    ``layout``: ``"contiguous"`` (default) or ``"zigzag"`` -- how :meth:`shard` splits a sequence.
    ``ring = n``: ring attention; both > 1: the hybrid (Ulysses inside runs of ``ulysses`` consecutive
    ranks, ring across them; constructing it creates subgroups, a collective: construct it once).

    Pass it to ``attnlib.attention(..., parallel=sp)``: q, k, v are this rank's shards (from
    :meth:`shard`), the mask describes the whole sequence, the result is this rank's shard.
    """

    def __init__(self, ulysses: int | None = None, ring: int | None = None, *, group=None,
                 layout: str = "contiguous"):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("SequenceParallel needs an initialized torch.distributed process group "
                               "(torch.distributed.init_process_group)")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.layout = layout
        for name, val in (("ulysses", ulysses), ("ring", ring)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 1):
                raise ValueError(f"{name} must be a positive int or None, got {val!r}")
        n = self.world_size
        if ulysses is None and ring is None:
            ulysses, ring = n, 1
        elif ulysses is None:
            if n % ring:
                raise ValueError(f"ring={ring} does not divide the group size {n}")
            ulysses = n // ring
        elif ring is None:
            if n % ulysses:
                raise ValueError(f"ulysses={ulysses} does not divide the group size {n}")
            ring = n // ulysses
        if ulysses * ring != n:
            raise ValueError(f"ulysses * ring must equal the group size: {ulysses} * {ring} != {n}")
        self.ulysses = ulysses
        self.ring = ring
        self.ulysses_group = self.ring_group = None
        if ring > 1 and ulysses > 1 and group is not None:
            raise NotImplementedError("the hybrid SequenceParallel(ulysses=..., ring=...) over a group other than the "
                                      "default one is not built yet (its subgroups are created over the default "
                                      "group); pass group=None, or use ulysses or ring alone")
        if ring > 1 and ulysses > 1:
            # hybrid: Ulysses inside each run of `ulysses` consecutive ranks, ring across them (collective)
            ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(n)]
            for i in range(ring):
                g = dist.new_group([ranks[i * ulysses + j] for j in range(ulysses)])
                if self.rank // ulysses == i:
                    self.ulysses_group = g
            for j in range(ulysses):
                g = dist.new_group([ranks[i * ulysses + j] for i in range(ring)])
                if self.rank % ulysses == j:
                    self.ring_group = g

    def __repr__(self):
        return (f"SequenceParallel(ulysses={self.ulysses}, ring={self.ring}, layout={self.layout!r}, "
                f"rank={self.rank}/{self.world_size})")

    # -- layout -----------------------------------------------------------------------------------
    def ranges(self, total: int, rank: int | None = None) -> tuple[tuple[int, int], ...]:
        """The ``(start, stop)`` ranges of a ``total``-token sequence that ``rank`` (default: this one) holds."""
        return rank_ranges(self.layout, int(total), self.world_size)[self.rank if rank is None else rank]

    def shard(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's part of the whole sequence ``x`` along ``dim`` (BSHD: 1, THD: 0). Differentiable;
        no communication."""
        dim = _dim(x, dim)
        parts = [x.narrow(dim, a, b - a) for a, b in self.ranges(x.shape[dim])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim)

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The whole sequence on every rank from each rank's shard ``x`` (the inverse of :meth:`shard`).

        Differentiable, with the convention that what follows the gather is the same on every rank
        (a replicated loss): the backward hands each rank its own slice of the incoming gradient, so
        gradients equal those of the single-process computation. If ranks compute *different*
        functions of the gathered tensor, all-reduce (sum) its gradient first.
        """
        return _Gather.apply(x, _dim(x, dim), self)

    # -- attention ---------------------------------------------------------------------------------
    def attention(self, q, k, v, mask=None, *, scale=None, backend=None, return_lse: bool = False):
        """``attnlib.attention(q, k, v, mask, parallel=self, ...)``: see that function."""
        if self.ring > 1 and self.ulysses == 1:
            from .ring import ring_attention

            return ring_attention(self, q, k, v, mask, scale, backend, return_lse)
        return _ulysses_attention(self, q, k, v, mask, scale, backend, return_lse)


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, sp):
        sizes = [s[0] for s in comm.all_gather_sizes([x.shape[dim]], x.device, sp.group)]
        total = total_from_sizes(sp.layout, sizes)
        parts = comm.all_gather_padded(x, dim, sizes, sp.group)
        out = torch.cat(parts, dim)
        inv = inverse_order(sp.layout, total, sp.world_size)
        if inv is not None:
            out = out.index_select(dim, inv.to(out.device))
        ctx.dim, ctx.sp = dim, sp
        return out

    @staticmethod
    def backward(ctx, grad):
        return ctx.sp.shard(grad, ctx.dim).contiguous(), None, None


# -- Ulysses ------------------------------------------------------------------------------------------
def _seq_to_heads(x, sizes, u, group, inv):
    """``[B, s_r, H, D]`` (this rank's tokens, all heads) -> ``[B, S, H/u, D]`` (the tokens of every rank
    of ``group`` in rank order -- then in global order when ``inv`` is given -- and this rank's heads)."""
    b, s, h, d = x.shape
    hp = h // u
    send = x.reshape(b, s, u, hp, d).permute(2, 0, 1, 3, 4)
    in_splits = [b * s * hp * d] * u
    out_splits = [b * sj * hp * d for sj in sizes]
    recv = comm.all_to_all(send, out_splits, in_splits, group)
    parts = [p.view(b, sj, hp, d) for p, sj in zip(recv.split(out_splits), sizes)]
    full = torch.cat(parts, 1)
    return full if inv is None else full.index_select(1, inv.to(full.device))


def _heads_to_seq(y, sizes, index, u, group, order):
    """The inverse of :func:`_seq_to_heads`: ``[B, S, H/u, D]`` -> ``[B, s_index, H, D]``."""
    if order is not None:
        y = y.index_select(1, order.to(y.device))
    b, _, hp, d = y.shape
    s = sizes[index]
    send = torch.cat([p.reshape(-1) for p in y.split(sizes, dim=1)])
    in_splits = [b * sj * hp * d for sj in sizes]
    out_splits = [b * s * hp * d] * u
    recv = comm.all_to_all(send, out_splits, in_splits, group)
    return recv.view(u, b, s, hp, d).permute(1, 2, 0, 3, 4).reshape(b, s, u * hp, d)


def _head_slice_mask(mask, rank: int, hq: int, u: int):
    """A ``DenseMask`` with a per-head axis keeps only this rank's query heads; other masks are whole."""
    from ..masks import DenseMask

    if not isinstance(mask, DenseMask):
        return mask
    m = mask.mask
    if m.dim() < 3 or m.shape[-3] == 1:
        return mask
    m4 = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
    if m4.shape[1] != hq:
        return mask                         # attnlib reports the shape mismatch
    hp = hq // u
    return DenseMask(m4[:, rank * hp:(rank + 1) * hp])


def _ulysses_attention(sp, q, k, v, mask, scale, backend, return_lse):
    from ..api import attention

    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        raise ValueError(f"q, k, v must all be BSHD [B, S, H, D] shards or all packed THD [T, H, D] shards; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    packed = q.dim() == 3
    qq, kk, vv = (t.unsqueeze(0) if packed else t for t in (q, k, v))
    hq, hkv, u = qq.shape[2], kk.shape[2], sp.ulysses
    if hq % u:
        raise ValueError(f"Ulysses sequence parallelism splits the {hq} query heads over ulysses={u} ranks, but "
                         f"{u} does not divide {hq}: choose a ulysses degree that divides the head count and use "
                         "ring for the rest of the group (SequenceParallel(ulysses=u, ring=n // u), or ring=n alone), "
                         "or pad the heads")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"the query head count ({hq}) must be a multiple of the kv head count ({hkv})")
    if vv.shape[2] != hkv:
        raise ValueError(f"k and v must have the same head count, got {hkv} and {vv.shape[2]}")
    if hkv % u:                          # GQA with fewer kv heads than the degree: replicate kv heads
        expanded = hkv * u // math.gcd(hkv, u)   # lcm: divides hq; query head h still reads its kv head
        kk = kk.repeat_interleave(expanded // hkv, dim=2)
        vv = vv.repeat_interleave(expanded // hkv, dim=2)
    sizes = comm.all_gather_sizes([qq.shape[1], kk.shape[1]], q.device, sp.group)
    q_sizes, k_sizes = [s[0] for s in sizes], [s[1] for s in sizes]
    sq = total_from_sizes(sp.layout, q_sizes)
    sk = total_from_sizes(sp.layout, k_sizes)
    local_mask = _head_slice_mask(mask, sp.rank % u, hq, u)
    if sp.ring > 1:
        out, lse = _hybrid(sp, qq, kk, vv, local_mask, q_sizes, k_sizes, sq, sk, scale, backend)
        out, lse = (out[0], lse[0]) if packed else (out, lse)
        return (out, lse) if return_lse else out
    n = sp.world_size
    inv_q, inv_k = inverse_order(sp.layout, sq, n), inverse_order(sp.layout, sk, n)
    qf = _seq_to_heads(qq, q_sizes, u, sp.group, inv_q)
    kf = _seq_to_heads(kk, k_sizes, u, sp.group, inv_k)
    vf = _seq_to_heads(vv, k_sizes, u, sp.group, inv_k)
    if packed:
        qf, kf, vf = qf[0], kf[0], vf[0]
    got = attention(qf, kf, vf, local_mask, scale=scale, backend=backend, return_lse=return_lse)
    out, lse = got if return_lse else (got, None)
    order = layout_order(sp.layout, sq, n)
    out = _heads_to_seq(out.unsqueeze(0) if packed else out, q_sizes, sp.rank, u, sp.group, order)
    out = out[0] if packed else out
    if not return_lse:
        return out
    lse4 = (lse.unsqueeze(0) if packed else lse).permute(0, 2, 1).unsqueeze(-1)    # [B, S, H/u, 1]
    lse_local = _heads_to_seq(lse4, q_sizes, sp.rank, u, sp.group, order)[..., 0].permute(0, 2, 1)  # [B, H, s_r]
    return out, (lse_local[0] if packed else lse_local)


def _member_ranges(sp, total: int, ring_member: int) -> tuple[tuple[int, int], ...]:
    """The global ranges a Ulysses group (ring member) holds after its all-to-all, adjacent ones merged."""
    u = sp.ulysses
    out = []
    for j in range(u):
        for a, b in sp.ranges(total, ring_member * u + j):
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            elif b > a or not out:
                out.append((a, b))
    return tuple(out) if out else ((0, 0),)


def _hybrid(sp, qq, kk, vv, mask, q_sizes, k_sizes, sq, sk, scale, backend):
    """Ulysses inside each group of ``ulysses`` consecutive ranks, ring across the groups."""
    from ..plan import plan_for
    from .ring import ring_core

    u, i, j = sp.ulysses, sp.rank // sp.ulysses, sp.rank % sp.ulysses
    members = range(i * u, (i + 1) * u)
    gq, gk = [q_sizes[m] for m in members], [k_sizes[m] for m in members]
    qh = _seq_to_heads(qq, gq, u, sp.ulysses_group, None)      # [B, s_group, Hq/u, D], member order
    kh = _seq_to_heads(kk, gk, u, sp.ulysses_group, None)
    vh = _seq_to_heads(vv, gk, u, sp.ulysses_group, None)
    out, lse = ring_core(qh, kh, vh, plan_for(mask, sq, sk), lambda m: _member_ranges(sp, sq, m),
                         lambda m: _member_ranges(sp, sk, m), i, sp.ring, sp.ring_group, scale, backend)
    out = _heads_to_seq(out, gq, j, u, sp.ulysses_group, None)
    lse = _heads_to_seq(lse.permute(0, 2, 1).unsqueeze(-1), gq, j, u, sp.ulysses_group, None)[..., 0].permute(0, 2, 1)
    return out, lse
