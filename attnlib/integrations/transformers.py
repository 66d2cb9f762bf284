"""attnlib as a transformers attention implementation.

    import attnlib.integrations.transformers as attnlib_hf
    attnlib_hf.register()                                   # once, before loading/using models
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="attnlib")
    model.set_attn_implementation("attnlib")                # or switch an existing model

Every attention call of the model then runs ``attnlib.attention``, honouring ``backend=`` given to
:func:`register`, ``attnlib.use_backend(...)`` and ``$DIFFUSION_ATTENTION_BACKEND``.

Only public extension points are used: ``AttentionInterface.register`` for the attention function and
``AttentionMaskInterface.register`` for the mask function (transformers' own ``sdpa_mask``: the model
builds exactly the boolean masks it builds for ``sdpa``, so semantics are transformers' own). What
transformers passes is translated to attnlib masks:

=========================================================  ==============================================
transformers passes                                        attnlib runs
=========================================================  ==============================================
no mask, causal module, ``Sq == Sk``                       ``Causal()``
no mask, causal module, ``Sq < Sk`` (empty static cache)   keys cropped to ``Sq``, ``Causal()`` (sdpa's
                                                           top-left ``is_causal`` semantics)
no mask, one query (decode), or a non-causal module        ``None``
4-D mask, plain causal / sliding window                    ``Causal()`` / ``Causal(window=W)``
4-D mask, one decode query with left padding               ``KeyPadding``
4-D mask, left-padded prompt, chunked prefill              packed rows + ``BlockDiagonal(causal=True)``
4-D mask, right-padded batch                               prompts causal + padded queries as full blocks
4-D mask from position ids restarting at 0 (packing)       packed rows + ``BlockDiagonal(causal=True)``
``cu_seq_lens_q/k`` kwargs (flash-style packing)           ``BlockDiagonal.from_cu_seqlens``
a mask with holes, per-head masks, additive biases         ``DenseMask`` (exact; see ``last_plan``)
=========================================================  ==============================================

Raises ``NotImplementedError`` naming the feature for: attention dropout in training, ``softcap``,
attention sinks (``s_aux``/``sinks``), ``position_bias`` (T5-style), ``output_attentions=True`` and
transformers' paged cache (continuous batching).
"""
from __future__ import annotations

try:
    import transformers  # noqa: F401
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError("attnlib.integrations.transformers needs the `transformers` package "
                      "(pip install 'transformers>=4.56'); attnlib itself works without it") from e

import torch

from ..masks import BlockDiagonal, Causal
from ..registry import canonical_name
from ._structure import MaskPlan, PackedPart, PlanCache, plan_from_dense

__all__ = ["register", "attnlib_attention_forward", "make_attention_function", "translate", "last_plan",
           "NAME"]

NAME = "attnlib"

_plans = PlanCache()
_last_plan: list = [None]


def last_plan() -> MaskPlan | None:
    """The plan of the most recent attention call (what mask attnlib ran): for tests and debugging."""
    return _last_plan[0]


def translate(query_bhsd: torch.Tensor, key_bhsd: torch.Tensor, attention_mask, *, causal: bool,
              sliding_window: int | None = None, cu_seqlens=None) -> tuple[MaskPlan, int | None]:
    """Turn what transformers passes into a :class:`~attnlib.integrations._structure.MaskPlan`.

    Returns ``(plan, crop_k)``: ``crop_k`` (or None) is the number of keys to keep (the empty tail of
    a static cache under transformers' top-left ``is_causal``).
    """
    B, _, Sq, _ = query_bhsd.shape
    Sk = key_bhsd.shape[2]
    if cu_seqlens is not None:
        cu_q, cu_k = cu_seqlens
        if B != 1:
            raise ValueError(f"cu_seq_lens_q/k describe sequences packed into batch 1, got batch {B}")
        window = sliding_window if causal else None
        bd = BlockDiagonal.from_cu_seqlens(cu_q, cu_k, causal=causal, window=window)
        if bd.total_q != Sq or bd.total_k != Sk:
            raise ValueError(f"cu_seq_lens_q/k cover {bd.total_q}/{bd.total_k} tokens but the call has "
                             f"{Sq} queries and {Sk} keys")
        return MaskPlan.packed([PackedPart(bd)]), None
    if attention_mask is None:
        if not causal or Sq == 1:
            return MaskPlan("none"), None
        if Sq > Sk:
            raise ValueError(f"causal attention with more queries ({Sq}) than keys ({Sk}) and no mask")
        # transformers' own masks already carry any binding window; a caller relying on the kwarg
        # alone (flash-style, no mask) gets it here: the W newest keys, diagonal included
        window = sliding_window if sliding_window is not None and sliding_window < Sq else None
        return MaskPlan("causal", Causal(window=window)), (Sq if Sk > Sq else None)
    if not isinstance(attention_mask, torch.Tensor):
        raise NotImplementedError(f"attention_mask of type {type(attention_mask).__name__} (e.g. flex BlockMask) is "
                                  "not supported by the attnlib implementation; the attnlib mask interface "
                                  "builds tensor masks")
    if attention_mask.dim() != 4:
        raise ValueError(f"expected transformers' 4-D attention mask [B, 1, Sq, Sk], got shape "
                         f"{tuple(attention_mask.shape)}; call register() so transformers builds masks for "
                         f"attn_implementation='{NAME}'")
    mask = attention_mask[..., :Sk] if attention_mask.shape[-1] > Sk else attention_mask
    return _plans.get(mask, lambda: plan_from_dense(mask, B, Sq, Sk)), None


def make_attention_function(backend: str | None = None):
    """An attention function for ``AttentionInterface`` that pins ``backend`` (None: selection rules)."""
    backend = None if backend is None else canonical_name(backend)

    def attnlib_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                                  scaling: float | None = None, is_causal: bool | None = None,
                                  sliding_window: int | None = None, softcap: float | None = None, **kwargs):
        """transformers attention function: BHSD in, ``(BSHD out, None)`` back."""
        _reject_unsupported(module, dropout, softcap, kwargs)
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        cu = None
        if kwargs.get("cu_seq_lens_q") is not None and attention_mask is None:
            cu = (kwargs["cu_seq_lens_q"], kwargs.get("cu_seq_lens_k", kwargs["cu_seq_lens_q"]))
        plan, crop_k = translate(query, key, attention_mask, causal=bool(causal), sliding_window=sliding_window,
                                 cu_seqlens=cu)
        _last_plan[0] = plan
        if crop_k is not None:
            key, value = key[:, :, :crop_k], value[:, :, :crop_k]
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        out = plan.run(q, k, v, scale=scaling, backend=backend)
        return out, None

    return attnlib_attention_forward


attnlib_attention_forward = make_attention_function()


def _reject_unsupported(module, dropout, softcap, kwargs) -> None:
    if dropout and dropout > 0.0:
        raise NotImplementedError(f"attention dropout (p={dropout}) is not supported by attn_implementation="
                                  f"'{NAME}'; use model.eval() or set the config's attention_dropout to 0")
    if softcap is not None:
        raise NotImplementedError(f"logit softcap (softcap={softcap}) is not supported by attn_implementation="
                                  f"'{NAME}'; use 'eager' for this model")
    for name in ("s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention sinks ({name}=...) are not supported by attn_implementation="
                                      f"'{NAME}'; use 'eager' for this model")
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"position_bias (T5-style relative bias) is not supported by attn_implementation="
                                  f"'{NAME}'; use 'eager' for this model")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(f"output_attentions=True needs the attention weights, which attn_implementation="
                                  f"'{NAME}' never materializes; use 'eager' to inspect them")
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise NotImplementedError(f"transformers' paged cache (continuous batching) is not supported by "
                                  f"attn_implementation='{NAME}'")


def register(name: str = NAME, backend: str | None = None) -> str:
    """Register attnlib with transformers under ``name`` (default ``"attnlib"``); returns the name.

    ``backend`` pins an attnlib backend for this name (e.g. ``register("attnlib_flex", backend="flex")``);
    by default each call follows ``use_backend`` / ``$DIFFUSION_ATTENTION_BACKEND`` / auto.
    Idempotent.
    """
    fn = attnlib_attention_forward if backend is None else make_attention_function(backend)
    AttentionInterface.register(name, fn)
    # transformers builds no mask at all for implementations missing from the mask interface; ours
    # gets the same boolean masks as sdpa, which translate() turns back into structure.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
