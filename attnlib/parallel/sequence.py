"""``SequenceParallel``: one attention call over a sequence split across the ranks of a process group.

Only :meth:`SequenceParallel.shard` and :meth:`SequenceParallel.gather` know the layout; the attention
call takes each rank's shards and a mask that describes the *whole* sequence, and returns this rank's
shard of the output (and of the LSE). Inside, every strategy reads one :class:`~.layout.Sharding` per
axis: which global ranges each rank holds.
"""
from __future__ import annotations

import copy
import math
import weakref

import torch
import torch.distributed as dist

from ..dispatch import run
from ..inputs import call_for, check_modifiers
from ..masks import as_plan, mask_features
from . import comm
from .layout import LAYOUTS, Sharding, joint_sharding, layout_sharding, rank_ranges, total_from_sizes
from .ring import ring_core

__all__ = ["SequenceParallel"]

#: subgroups of the hybrid, per (ranks of the parent group, ulysses degree): created once and reused while
#: they exist. Held by weak reference: the cache never keeps a group alive after
#: ``dist.destroy_process_group()`` (a group kept alive keeps its gloo worker threads running into the
#: interpreter's shutdown, where one that finishes releasing a collective's tensors aborts the process)
_SUBGROUPS: dict = {}


class SequenceParallel:
    """Sequence parallelism over a process group (default: the default group).

    ``ulysses``: the all-to-all degree (sequence <-> heads); ``ring``: the ring degree;
    ``ulysses * ring`` must equal the group's size. With neither given, ``ulysses`` is the group size.
    ``layout``: ``"contiguous"`` (default) or ``"zigzag"`` -- how :meth:`shard` splits a sequence.
    ``ring = n``: ring attention; both > 1: the hybrid (Ulysses inside runs of ``ulysses`` consecutive
    ranks of the group, ring across them). The hybrid's subgroups are created on first construction
    (every rank of the group must construct it; ranks outside the group need not) and reused after.

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
        if self.rank < 0:
            raise ValueError("this process is not a member of group=: construct SequenceParallel only on its ranks")
        self.layout = layout
        self.seqlens: tuple[int, int] | None = None
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
        if ring > 1 and ulysses > 1:
            self.ulysses_group, self.ring_group = _hybrid_groups(group, n, self.rank, ulysses)

    def __repr__(self):
        lens = "" if self.seqlens is None else f", seqlens={self.seqlens}"
        return (f"SequenceParallel(ulysses={self.ulysses}, ring={self.ring}, layout={self.layout!r}, "
                f"rank={self.rank}/{self.world_size}{lens})")

    def with_seqlens(self, seqlen_q: int, seqlen_k: int | None = None) -> "SequenceParallel":
        """A copy (same groups) that knows the whole sequence lengths, so its calls exchange nothing to
        learn them: no host synchronization. ``seqlen_k`` defaults to ``seqlen_q``. For
        :meth:`joint_attention` the lengths are those of the joint sequence (text + image).

        A rank whose shard does not match raises a ``ValueError``; the other ranks then wait in the
        next collective until the group's timeout, so prefer it where every rank shards the same tensors.
        """
        for name, val in (("seqlen_q", seqlen_q), ("seqlen_k", seqlen_k)):
            if val is not None and (isinstance(val, bool) or not isinstance(val, int) or val < 0):
                raise ValueError(f"{name} must be a non-negative int, got {val!r}")
        out = copy.copy(self)
        out.seqlens = (seqlen_q, seqlen_q if seqlen_k is None else seqlen_k)
        return out

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

    def gather(self, x: torch.Tensor, dim: int = 1, total: int | None = None, *,
               sum_gradients: bool = False) -> torch.Tensor:
        """The whole sequence on every rank from each rank's shard ``x`` (the inverse of :meth:`shard`).

        Differentiable, with the convention that what follows the gather is the same on every rank
        (a replicated loss): the backward hands each rank its own slice of the incoming gradient, so
        gradients equal those of the single-process computation. If ranks compute *different*
        functions of the gathered tensor, all-reduce (sum) its gradient first.

        ``total``: the whole length, when known (skips the exchange of the local lengths, a host
        synchronization). ``sum_gradients=True``: ranks use the gathered tensor differently (e.g. each
        takes another shard of a sequence built from it); the backward all-reduces (sums) the
        gradient before taking this rank's slice.
        """
        dim = _dim(x, dim)
        if total is not None:
            sh = self._known(int(total), x.shape[dim], "x")
        else:
            sizes = [s[0] for s in comm.all_gather_sizes([x.shape[dim]], x.device, self.group)]
            sh = layout_sharding(self.layout, total_from_sizes(self.layout, sizes), self.world_size)
        out = _Gather.apply(x, dim, sh, self.group)
        return _SumGradient.apply(out, self.group) if sum_gradients else out

    # -- attention ---------------------------------------------------------------------------------
    def attention(self, q, k, v, mask=None, *, scale=None, softcap=None, alibi_slopes=None, sinks=None,
                  backend=None, return_lse: bool = False):
        """``attnlib.attention(q, k, v, mask, parallel=self, ...)``: see that function."""
        qq, kk, vv, packed = _as_bshd(q, k, v)
        sq, sk = self._whole_lengths(qq.shape[1], kk.shape[1], mask, q.device)
        qsh = self._known(sq, qq.shape[1], "q")
        ksh = self._known(sk, kk.shape[1], "k")
        plan = _whole_plan(mask, qq, sq, sk, packed, softcap, alibi_slopes, sinks)
        out, lse = _run(self, qq, kk, vv, plan, qsh, ksh, scale, backend, return_lse)
        if packed:
            out, lse = out[0], (None if lse is None else lse[0])
        return (out, lse) if return_lse else out

    def joint_attention(self, q, k, v, joint_q, joint_k, joint_v, mask=None, *, joint_strategy: str = "front",
                        scale=None, softcap=None, alibi_slopes=None, sinks=None, backend=None,
                        return_lse: bool = False):
        """Attention over a joint sequence of a replicated stream and a sharded one (MMDiT text + image).

        ``q, k, v``: this rank's shards of the sharded stream (image tokens, from :meth:`shard`);
        ``joint_q/k/v``: the replicated stream (text), whole and equal on every rank; both BSHD. The
        joint sequence is ``[joint; sharded]`` for ``joint_strategy="front"`` and ``[sharded; joint]``
        for ``"rear"`` (vLLM-Omni's names), and ``mask`` describes it whole (e.g. ``KeyPadding`` of the
        text padding over the joint keys). Self-attention: q and k cover the same joint sequence.

        Returns this rank's rows in joint order, as vLLM-Omni's layer does: ``[text (whole); image
        shard]`` for front, ``[image shard; text (whole)]`` for rear (and the LSE likewise, ``[B, H, .]``).
        Exact for every strategy: the text is split over the ranks like the image, so no rank computes
        it twice, and its output is all-gathered. Gradients: the replicated stream gets its whole
        gradient on every rank (given the same gradient of its whole output on every rank), the
        sharded stream its shard's.
        """
        if joint_strategy not in ("front", "rear"):
            raise ValueError(f"joint_strategy must be 'front' or 'rear', got {joint_strategy!r}")
        for name, t in (("q", q), ("k", k), ("v", v), ("joint_q", joint_q), ("joint_k", joint_k),
                        ("joint_v", joint_v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a BSHD [B, S, H, D] tensor, got "
                                 f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if k.shape[1] != q.shape[1] or joint_k.shape[1] != joint_q.shape[1] or joint_v.shape[1] != joint_k.shape[1] \
                or v.shape[1] != k.shape[1]:
            raise ValueError(f"joint_attention is self-attention over one joint sequence: q, k, v must hold the same "
                             f"tokens (got {q.shape[1]}, {k.shape[1]}, {v.shape[1]}) and so must joint_q, joint_k, "
                             f"joint_v (got {joint_q.shape[1]}, {joint_k.shape[1]}, {joint_v.shape[1]})")
        text = joint_q.shape[1]
        total, _ = self._whole_lengths(text + q.shape[1], text + k.shape[1], mask, q.device, joint=text)
        n = self.world_size
        sh = joint_sharding(self.layout, text, total - text, n, joint_strategy)
        self._known(total - text, q.shape[1], "q")     # this rank's image shard must be its layout part
        text_sh = layout_sharding("contiguous", text, n)          # the text's pieces, one per rank
        t_sizes = text_sh.sizes
        t0 = sum(t_sizes[:self.rank])
        jq, jk, jv = (_ReplicatedSlice.apply(t, t0, t_sizes, self.group) for t in (joint_q, joint_k, joint_v))

        def cat(j, x):
            return torch.cat([j, x] if joint_strategy == "front" else [x, j], 1)

        plan = _whole_plan(mask, q, total, total, False, softcap, alibi_slopes, sinks)
        out, lse = _run(self, cat(jq, q), cat(jk, k), cat(jv, v), plan, sh, sh, scale, backend, return_lse)
        mine = t_sizes[self.rank]
        split = (mine, out.shape[1] - mine) if joint_strategy == "front" else (out.shape[1] - mine, mine)
        o_text, o_img = _text_first(out.split(split, 1), joint_strategy)
        o_text = _Gather.apply(o_text, 1, text_sh, self.group)
        out = cat(o_text, o_img)
        if not return_lse:
            return out
        l_text, l_img = _text_first(lse.split(split, -1), joint_strategy)
        l_text = _Gather.apply(l_text.contiguous(), 2, text_sh, self.group)
        lse = torch.cat([l_text, l_img] if joint_strategy == "front" else [l_img, l_text], -1)
        return out, lse

    # -- whole lengths --------------------------------------------------------------------------------
    def whole_length(self, local: int, device=None) -> int:
        """The whole length of a sequence of which this rank holds ``local`` tokens (its :meth:`shard`):
        one all-gather of the local lengths (a host synchronization)."""
        if device is None:
            device = f"cuda:{torch.cuda.current_device()}" if dist.get_backend(self.group) == "nccl" else "cpu"
        sizes = [s[0] for s in comm.all_gather_sizes([int(local)], device, self.group)]
        return total_from_sizes(self.layout, sizes)

    def _whole_lengths(self, local_q: int, local_k: int, mask, device, joint: int = 0) -> tuple[int, int]:
        """The whole ``(S_q, S_k)``: from :meth:`with_seqlens`, else from the mask when it names both, else
        one all-gather of the local lengths (a host synchronization). ``joint``: replicated tokens
        (the text of :meth:`joint_attention`) counted in the local lengths but not split by the layout."""
        if self.seqlens is not None:
            return self.seqlens
        known = _mask_lengths(mask, self_attention=joint > 0)
        if known is not None:
            return known
        sizes = comm.all_gather_sizes([local_q - joint, local_k - joint], device, self.group)
        sq = total_from_sizes(self.layout, [s[0] for s in sizes])
        sk = total_from_sizes(self.layout, [s[1] for s in sizes])
        return sq + joint, sk + joint

    def _known(self, total: int, local: int, name: str) -> Sharding:
        """The layout's sharding of ``total`` tokens; ValueError if this rank's ``local`` length is not its part."""
        sh = layout_sharding(self.layout, total, self.world_size)
        if sh.sizes[self.rank] != local:
            raise ValueError(f"{name} holds {local} tokens on rank {self.rank}, but the whole sequence of {total} "
                             f"tokens gives it {sh.sizes[self.rank]} ({self.layout!r} split over "
                             f"{self.world_size} ranks): shard every tensor with SequenceParallel.shard, and give "
                             "the mask (or with_seqlens) the whole sequence's lengths")
        return sh


def _text_first(pieces, strategy):
    return pieces if strategy == "front" else pieces[::-1]


def _mask_lengths(mask, self_attention: bool = False):
    """``(S_q, S_k)`` when the mask names both whole lengths (a self-attention call, where ``S_q == S_k``,
    needs only one), else None."""
    if mask is None:
        return None
    sq, sk = mask.lengths()
    if self_attention:
        sq = sq if sq is not None else sk
        sk = sk if sk is not None else sq
    return None if sq is None or sk is None else (sq, sk)


def _whole_plan(mask, q, sq: int, sk: int, packed: bool, softcap, alibi_slopes, sinks):
    """The whole sequence's plan (mask checked against the whole call, score modifiers attached)."""
    if mask is not None:
        mask_features(mask)
        mask.check_call(packed=packed, batch=q.shape[0], seqlen_q=sq, seqlen_k=sk, heads_q=q.shape[2],
                        device=q.device, dtype=q.dtype)
    plan = as_plan(mask, sq, sk)
    mods = check_modifiers(softcap, alibi_slopes, sinks, q.shape[0], q.shape[2], q)
    return plan.with_call(mods)


def _hybrid_groups(group, n: int, rank: int, u: int):
    """This rank's Ulysses subgroup (``u`` consecutive ranks of ``group``) and ring subgroup (the ranks
    ``u`` apart); created with group-local synchronization once per (ranks, u) and reused until destroyed."""
    ranks = tuple(range(n)) if group is None else tuple(dist.get_global_rank(group, r) for r in range(n))
    key = (ranks, u)
    cached = tuple(ref() for ref in _SUBGROUPS.get(key, ()))
    if cached and all(g is not None and _live(g) for g in cached):
        return cached
    i, j, r = rank // u, rank % u, n // u
    ug = dist.new_group([ranks[i * u + m] for m in range(u)], use_local_synchronization=True)
    rg = dist.new_group([ranks[m * u + j] for m in range(r)], use_local_synchronization=True)
    _SUBGROUPS[key] = (weakref.ref(ug), weakref.ref(rg))
    return ug, rg


def _live(group) -> bool:
    """Whether ``group`` is still registered (not destroyed by ``dist.destroy_process_group``)."""
    try:
        dist.get_process_group_ranks(group)
    except (KeyError, ValueError, RuntimeError):
        return False
    return True


def _as_bshd(q, k, v):
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        raise TypeError("q, k, v must be tensors")
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        raise ValueError(f"q, k, v must all be BSHD [B, S, H, D] shards or all packed THD [T, H, D] shards; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    packed = q.dim() == 3
    qq, kk, vv = (t.unsqueeze(0) if packed else t for t in (q, k, v))
    return qq, kk, vv, packed


def _run(sp, qq, kk, vv, plan, qsh: Sharding, ksh: Sharding, scale, backend, want_lse):
    """Dispatch to the strategy: BSHD shards and the whole call's plan in, ``(out [B, s, Hq, Dv], lse
    [B, Hq, s] or None)`` out."""
    if sp.ring > 1 and sp.ulysses == 1:
        return ring_core(qq, kk, vv, plan, lambda m: qsh.ranges[m], lambda m: ksh.ranges[m], sp.rank,
                         sp.world_size, sp.group, scale, backend)
    return _ulysses(sp, qq, kk, vv, plan, qsh, ksh, scale, backend, want_lse)


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim={dim} is out of range for a {x.dim()}-D tensor")
    return dim % x.dim()


class _Gather(torch.autograd.Function):
    """The whole sequence from each rank's shard of ``sh``; backward: this rank's slice of the gradient."""

    @staticmethod
    def forward(ctx, x, dim, sh, group):
        parts = comm.all_gather_padded(x, dim, sh.sizes, group)
        out = torch.cat(parts, dim)
        inv = sh.inverse()
        if inv is not None:
            out = out.index_select(dim, inv.to(out.device))
        ctx.dim, ctx.ranges = dim, sh.ranges[dist.get_rank(group)]
        return out

    @staticmethod
    def backward(ctx, grad):
        parts = [grad.narrow(ctx.dim, a, b - a) for a, b in ctx.ranges]
        return (parts[0] if len(parts) == 1 else torch.cat(parts, ctx.dim)).contiguous(), None, None, None


class _SumGradient(torch.autograd.Function):
    """Identity; backward: the gradient summed over the ranks of ``group``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReplicatedSlice(torch.autograd.Function):
    """This rank's contiguous piece (along dim 1) of a tensor every rank holds whole; backward: the pieces'
    gradients all-gathered, so every rank gets the whole gradient of the replicated tensor."""

    @staticmethod
    def forward(ctx, x, start, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        return x.narrow(1, start, sizes[dist.get_rank(group)]).contiguous()

    @staticmethod
    def backward(ctx, grad):
        return torch.cat(comm.all_gather_padded(grad.contiguous(), 1, ctx.sizes, ctx.group), 1), None, None, None


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


def _ulysses(sp, qq, kk, vv, plan, qsh: Sharding, ksh: Sharding, scale, backend, want_lse):
    """Ulysses (``ring == 1``) or the hybrid on BSHD shards; ``(out, lse or None)`` of this rank's tokens."""
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
    hp = hq // u
    j = sp.rank % u
    sinks = plan.mods.sinks
    if sinks is not None and sinks.requires_grad:     # each rank differentiates its heads' sinks: sum them
        mods = plan.mods
        plan = plan.with_call(type(mods)(mods.softcap, mods.alibi,
                                         _SumGradient.apply(sinks, sp.group if sp.ring == 1 else sp.ulysses_group)),
                              plan.kv)
    local = plan.restrict_heads(j * hp, (j + 1) * hp, hq)        # per-head tensors, ALiBi slopes and sinks
    if sp.ring > 1:
        return _hybrid(sp, qq, kk, vv, local, qsh, ksh, scale, backend, want_lse)
    q_sizes, k_sizes = qsh.sizes, ksh.sizes
    inv_q, inv_k = qsh.inverse(), ksh.inverse()
    qf = _seq_to_heads(qq, q_sizes, u, sp.group, inv_q)
    kf = _seq_to_heads(kk, k_sizes, u, sp.group, inv_k)
    vf = _seq_to_heads(vv, k_sizes, u, sp.group, inv_k)
    out, lse = run(call_for(qf, kf, vf, local, scale, want_lse), backend)
    order = qsh.order()
    out = _heads_to_seq(out, q_sizes, sp.rank, u, sp.group, order)
    if not want_lse:
        return out, None
    lse4 = lse.permute(0, 2, 1).unsqueeze(-1)                                            # [B, S, H/u, 1]
    return out, _heads_to_seq(lse4, q_sizes, sp.rank, u, sp.group, order)[..., 0].permute(0, 2, 1)   # [B, H, s_r]


def _member_ranges(sh: Sharding, u: int, ring_member: int) -> tuple[tuple[int, int], ...]:
    """The global ranges a Ulysses group (ring member) holds after its all-to-all, adjacent ones merged."""
    out = []
    for j in range(u):
        for a, b in sh.ranges[ring_member * u + j]:
            if out and out[-1][1] == a:
                out[-1] = (out[-1][0], b)
            elif b > a or not out:
                out.append((a, b))
    return tuple(out) if out else ((0, 0),)


def _hybrid(sp, qq, kk, vv, plan, qsh: Sharding, ksh: Sharding, scale, backend, want_lse):
    """Ulysses inside each group of ``ulysses`` consecutive ranks, ring across the groups."""
    u, i, j = sp.ulysses, sp.rank // sp.ulysses, sp.rank % sp.ulysses
    members = range(i * u, (i + 1) * u)
    gq, gk = [qsh.sizes[m] for m in members], [ksh.sizes[m] for m in members]
    qh = _seq_to_heads(qq, gq, u, sp.ulysses_group, None)      # [B, s_group, Hq/u, D], member order
    kh = _seq_to_heads(kk, gk, u, sp.ulysses_group, None)
    vh = _seq_to_heads(vv, gk, u, sp.ulysses_group, None)
    out, lse = ring_core(qh, kh, vh, plan, lambda m: _member_ranges(qsh, u, m),
                         lambda m: _member_ranges(ksh, u, m), i, sp.ring, sp.ring_group, scale, backend)
    out = _heads_to_seq(out, gq, j, u, sp.ulysses_group, None)
    if not want_lse:
        return out, None
    lse = _heads_to_seq(lse.permute(0, 2, 1).unsqueeze(-1), gq, j, u, sp.ulysses_group, None)[..., 0].permute(0, 2, 1)
    return out, lse
