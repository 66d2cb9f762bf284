"""Cross-backend parity of the reference blocks: the ``models`` section of ``attnlib check``.

Each case builds a tiny model with fixed weights and inputs, then compares our block, run on one
backend, with a **reference**:

* where the authors' code is installed (diffusers for QwenImage, transformers for Qwen3-Omni) the
  reference is their model in float64 and the *naive* error is their model's error in the test dtype;
* otherwise (Bagel, or a missing host library) the reference is our block in float64 on ``math`` and
  the naive error is our block in the test dtype on ``math``.

A row passes when ``max_diff <= attnlib.testing.tolerance(naive, dtype, ref)``: the same policy as the
conformance suite (at most ``ERROR_RATIO`` times the naive error, plus the dtype floor).

``model_parity_rows(["math", "sdpa"])`` runs in a few seconds on a CPU. ``check_section`` prints the rows
for ``attnlib check``, which finds it through the ``attnlib.check_sections`` entry point (pyproject.toml).
"""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from typing import Callable

import torch

import attnlib
from attnlib.settings import FALLBACK
from attnlib.testing import max_abs_error, tolerance

__all__ = ["model_parity_rows", "check_section", "CASES", "ParityCase", "qwen_image_case", "bagel_case", "code_predictor_case",
           "thinker_attention_case", "bagel_cfg_scene", "host_available", "reference", "no_fallback", "seeded_block",
           "assert_within_tolerance"]


def host_available(module: str) -> str | None:
    """None if ``module`` imports, else the reason."""
    try:
        __import__(module)
    except Exception as e:  # noqa: BLE001 -- any import failure means "not installed here"
        return f"{module} not importable ({type(e).__name__}: {e})"
    return None


@dataclass
class ParityCase:
    """``build(dtype, device)`` -> ``(ours_fn, host_fn | None)``; each ``fn()`` returns the compared tensor.

    ``ours_fn`` runs under whatever backend is selected when it is called; ``host_fn`` is the authors'
    model. Both are built fresh per dtype from the same seeded weights.
    """

    model: str
    host: str | None           # module of the authors' code, or None
    build: Callable


def _seeded(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def seeded_block(cls, kwargs: dict, seed: int, std: float) -> torch.nn.Module:
    """``cls(**kwargs)`` in eval mode, built after ``torch.manual_seed(seed)`` with every parameter then
    drawn from ``N(0, std^2)`` (in ``parameters()`` order, from the global generator): the same weights
    for the same arguments."""
    torch.manual_seed(seed)
    block = cls(**kwargs)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=std)
    return block.eval()


def _host_like(host: torch.nn.Module, ours: torch.nn.Module, device, dtype) -> torch.nn.Module:
    """The authors' ``host`` model in eval mode, holding ``ours``' weights (strictly), on ``device`` in ``dtype``."""
    host.eval().load_state_dict(ours.state_dict(), strict=True)
    torch.nn.Module.to(host, device, dtype)  # (diffusers' .to(dtype) logs advice meant for checkpoints)
    return host


# ---------------------------------------------------------------------------------------------------
# QwenImage: vs diffusers, CFG batch of a long prompt and a short padded negative prompt
# ---------------------------------------------------------------------------------------------------
QWEN_IMAGE_CONFIG = dict(patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16,
                         num_attention_heads=2, joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def qwen_image_inputs(dtype, *, batch_valid=(9, 3), width=9, grid=(1, 4, 6), seed=1, device="cpu"):
    """CFG batch: row b has ``batch_valid[b]`` real text tokens, right-padded to ``width``."""
    g = torch.Generator().manual_seed(seed)
    b = len(batch_valid)
    s_img = grid[0] * grid[1] * grid[2]
    x = torch.randn(b, s_img, QWEN_IMAGE_CONFIG["in_channels"], generator=g).to(dtype)
    e = torch.randn(b, width, QWEN_IMAGE_CONFIG["joint_attention_dim"], generator=g).to(dtype)
    mask = torch.zeros(b, width, dtype=torch.long)
    for i, n in enumerate(batch_valid):
        mask[i, :n] = 1
    t = torch.linspace(0.2, 0.8, b).to(dtype)
    return x.to(device), e.to(device), mask.to(device), t.to(device), [[grid]] * b


def qwen_image_case() -> ParityCase:
    def build(dtype, device="cpu"):
        from .qwen_image import QwenImageTransformer2DModel
        _seeded(0)
        ours = QwenImageTransformer2DModel(**QWEN_IMAGE_CONFIG)
        torch.nn.init.normal_(ours.proj_out.weight, std=0.2)
        host = None
        if host_available("diffusers") is None:
            from diffusers import QwenImageTransformer2DModel as DiffusersQwenImage
            host = _host_like(DiffusersQwenImage(**QWEN_IMAGE_CONFIG), ours, device, dtype)
        ours = ours.eval().to(device, dtype)
        args = qwen_image_inputs(dtype, device=device)
        ours_fn = lambda: ours(*args)  # noqa: E731
        host_fn = None if host is None else (lambda: host(*args).sample)
        return ours_fn, host_fn
    return ParityCase("qwen_image", "diffusers", build)


# ---------------------------------------------------------------------------------------------------
# Bagel: understanding prefill/decode + one CFG-batched generation step (no installable host)
# ---------------------------------------------------------------------------------------------------
BAGEL_CONFIG = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0)


def bagel_cfg_scene(attn, dtype, *, text_len=5, image_tokens=4, target_tokens=6, seed=2, device="cpu"):
    """Run Bagel's inference scene on one ``PackedAttentionMoT`` layer; return every output, concatenated.

    Three sequences are prefilled: *full* (text prompt + context image), *text-dropped* (context image
    only) and *image-dropped* (text only) -- the CFG branches, with caches of different lengths. The
    full branch then decodes one text token (causal against its cache); finally one denoising step of
    the noised target (markers + VAE tokens) runs for the three branches in one call.
    """
    from .bagel import BagelKVCache, BagelPositions
    g = torch.Generator().manual_seed(seed)
    hid = attn.q_proj.in_features
    rand = lambda n: torch.randn(n, hid, generator=g).to(device, dtype)  # noqa: E731
    text, image, target, decode_tok = rand(text_len), rand(image_tokens + 2), rand(target_tokens + 2), rand(1)
    pos = [BagelPositions() for _ in range(3)]           # full, text-dropped, image-dropped
    cache = BagelKVCache.empty(3)
    outs = []
    # text prompt: full and image-dropped branches (causal prefill)
    text_pos = torch.cat([pos[0].text(text_len), pos[2].text(text_len)])
    outs.append(attn(torch.cat([text, text]), [text_len, text_len], text_pos, cache.select([0, 2]), causal=True))
    # context image (ViT/VAE prefill, non-causal): full and text-dropped branches
    n_img = image_tokens + 2
    outs.append(attn(torch.cat([image, image]), [n_img, n_img], torch.cat([pos[0].image(n_img), pos[1].image(n_img)]),
                     cache.select([0, 1]), causal=False))
    # one decoded text token on the full branch (bottom-right causal against its cache)
    outs.append(attn(decode_tok, [1], pos[0].text(1), cache.select([0]), causal=True))
    # one denoising step, three CFG branches batched; markers use the understanding expert
    n_t = target_tokens + 2
    gen = torch.ones(n_t, dtype=torch.bool, device=device)
    gen[0] = gen[-1] = False
    outs.append(attn(torch.cat([target] * 3), [n_t] * 3, torch.cat([p.noised_image(n_t) for p in pos]), cache,
                     causal=False, gen=gen.repeat(3), update_cache=False))
    return torch.cat(outs)


def bagel_case() -> ParityCase:
    def build(dtype, device="cpu"):
        from .bagel import PackedAttentionMoT
        attn = seeded_block(PackedAttentionMoT, BAGEL_CONFIG, 3, std=0.25).to(device, dtype)
        return (lambda: bagel_cfg_scene(attn, dtype, device=device)), None
    return ParityCase("bagel", None, build)


# ---------------------------------------------------------------------------------------------------
# Qwen3-Omni: code predictor (full forward and step-by-step decode), thinker attention (padded batch)
# ---------------------------------------------------------------------------------------------------
#: the code predictor's config: our ``CodePredictor(**...)`` and transformers' config take the same keys
CODE_PREDICTOR_KWARGS = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, vocab_size=40, num_code_groups=4)


def code_predictor_config():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerCodePredictorConfig
    cfg = Qwen3OmniMoeTalkerCodePredictorConfig(**CODE_PREDICTOR_KWARGS)
    cfg._attn_implementation = "eager"
    return cfg


def code_predictor_case() -> ParityCase:
    """Prefill ``[talker hidden, code 0]`` then decode the remaining groups one by one (KV cache)."""
    def build(dtype, device="cpu"):
        from .qwen3_omni import CodePredictor, KVCache
        ours = seeded_block(CodePredictor, CODE_PREDICTOR_KWARGS, 4, std=0.2)
        host = None
        if host_available("transformers") is None:
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeTalkerCodePredictorModel
            host = _host_like(Qwen3OmniMoeTalkerCodePredictorModel(code_predictor_config()), ours, device, dtype)
        ours = ours.to(device, dtype)
        g = torch.Generator().manual_seed(5)
        x = torch.randn(2, 5, CODE_PREDICTOR_KWARGS["hidden_size"], generator=g).to(device, dtype)

        def ours_fn():
            cache = KVCache()
            steps = [ours(x[:, :2], cache)] + [ours(x[:, i:i + 1], cache) for i in range(2, x.shape[1])]
            return torch.cat([ours(x), torch.cat(steps, dim=1)], dim=1)
        host_fn = None if host is None else (lambda: host(inputs_embeds=x).last_hidden_state.repeat(1, 2, 1))
        return ours_fn, host_fn
    return ParityCase("qwen3_omni.code_predictor", "transformers", build)


#: the thinker attention's config (our ``ThinkerAttention(**...)``); transformers' config is derived from it
THINKER_KWARGS = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16, rope_theta=10000.0,
                      mrope_section=(3, 3, 2))


def thinker_text_config():
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTextConfig
    kw = dict(THINKER_KWARGS)
    rope = {"rope_type": "default", "rope_theta": kw.pop("rope_theta"), "mrope_section": list(kw.pop("mrope_section")),
            "mrope_interleaved": True}
    cfg = Qwen3OmniMoeTextConfig(**kw, rope_parameters=rope)
    cfg._attn_implementation = "eager"
    return cfg


def thinker_inputs(dtype, seed=6, device="cpu"):
    """A left-padded batch of two with multimodal ``position_ids [3, B, S]`` (an image grid in row 0)."""
    g = torch.Generator().manual_seed(seed)
    b, s = 2, 7
    h = torch.randn(b, s, THINKER_KWARGS["hidden_size"], generator=g).to(dtype)
    valid = torch.ones(b, s, dtype=torch.bool)
    valid[1, :3] = False                                   # left padding
    t = torch.arange(s)
    pos = torch.stack([t, t, t])[:, None].repeat(1, b, 1)
    pos[1, 0, 2:6] = torch.tensor([2, 2, 3, 3])           # a 2x2 image: height/width rows differ
    pos[2, 0, 2:6] = torch.tensor([2, 3, 2, 3])
    pos[0, 0, 2:6] = 2
    pos[:, 0, 6] = 4
    pos[:, 1] = (torch.cumsum(valid[1].long(), 0) - 1).clamp_min(0)
    return h.to(device), pos.to(device), valid.to(device)


def thinker_attention_case() -> ParityCase:
    """Only the valid query rows are compared (padded rows differ by design: attnlib returns 0)."""
    def build(dtype, device="cpu"):
        from .qwen3_omni import ThinkerAttention
        ours = seeded_block(ThinkerAttention, THINKER_KWARGS, 7, std=0.2)
        h, pos, valid = thinker_inputs(dtype, device=device)
        host_fn = None
        if host_available("transformers") is None:
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (
                Qwen3OmniMoeThinkerTextAttention, Qwen3OmniMoeThinkerTextRotaryEmbedding)
            cfg = thinker_text_config()
            host = _host_like(Qwen3OmniMoeThinkerTextAttention(cfg, 0), ours, device, dtype)
            cos, sin = Qwen3OmniMoeThinkerTextRotaryEmbedding(cfg).to(device)(h, pos)
            s = h.shape[1]
            keep = torch.ones(s, s, dtype=torch.bool, device=device).tril()[None, None] & valid[:, None, None, :]
            additive = torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill(~keep, torch.finfo(dtype).min)
            host_fn = lambda: host(h, (cos, sin), additive)[0][valid]  # noqa: E731
        ours = ours.to(device, dtype)
        ours_fn = lambda: ours(h, ours.rope_tables(pos), valid)[valid]  # noqa: E731
        return ours_fn, host_fn
    return ParityCase("qwen3_omni.thinker_attention", "transformers", build)


CASES = (qwen_image_case, bagel_case, code_predictor_case, thinker_attention_case)


# ---------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def reference(case: ParityCase, dtype, device="cpu"):
    """``(ours_fn, ref64, naive, note)`` for a case (``ours_fn`` built in ``dtype``), or raises."""
    ours64, host64 = case.build(torch.float64, device)
    ours_d, host_d = case.build(dtype, device)
    if host64 is not None:
        return ours_d, host64(), host_d(), f"vs {case.host} float64"
    with attnlib.use_backend("math"):
        ref, naive = ours64(), ours_d()
    why = f"{case.host} not installed; " if case.host else ""
    return ours_d, ref, naive, f"{why}vs math float64"


def assert_within_tolerance(out, ref64, naive, dtype=torch.float32, what="out"):
    """The parity policy as an assertion: ``out``'s error against ``ref64`` is at most the tolerance that
    ``naive`` (the reference run in ``dtype``) earns."""
    err, tol = max_abs_error(out, ref64), tolerance(max_abs_error(naive, ref64), dtype, ref64)
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g}"


@contextlib.contextmanager
def no_fallback():
    """``ATTNLIB_FALLBACK=error`` inside: a backend that cannot serve a call raises instead of handing it
    to another backend, so a row is only ever measured on the backend it names."""
    old = os.environ.get(FALLBACK)
    os.environ[FALLBACK] = "error"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(FALLBACK, None)
        else:
            os.environ[FALLBACK] = old


def model_parity_rows(backends: list[str], dtype: torch.dtype = torch.float32, cases=None,
                      device: str | None = None) -> list[dict]:
    """One row per (model block, backend): ``model, backend, max_diff, tol, passed, note`` (+ ``dtype,
    device, seconds``). ``device`` defaults to CUDA when available, else CPU.

    An unavailable backend gets a row with ``passed=None`` and its reason; a case whose build fails
    (e.g. an incompatible host library) gets one ``passed=None`` row per backend saying why.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    available = {r["name"]: r for r in attnlib.list_backends()}
    rows = []
    for make in cases or CASES:
        case = make()
        base = dict(model=case.model, dtype=str(dtype).replace("torch.", ""), device=device)
        try:
            run, ref, naive, note = reference(case, dtype, device)
        except Exception as e:  # noqa: BLE001 -- reported in the table, never fatal for `attnlib check`
            rows += [dict(base, backend=b, max_diff=None, tol=None, passed=None, seconds=0.0,
                          note=f"skipped: {type(e).__name__}: {e}") for b in backends]
            continue
        naive_err = max_abs_error(naive, ref)
        tol = tolerance(naive_err, dtype, ref)
        for b in backends:
            row = available.get(b)
            if row is None or not row["available"]:
                reason = "unknown backend" if row is None else row["reason"]
                rows.append(dict(base, backend=b, max_diff=None, tol=tol, passed=None, seconds=0.0,
                                 note=f"backend unavailable: {reason}"))
                continue
            t0 = time.perf_counter()
            try:
                with attnlib.use_backend(b), no_fallback(), torch.no_grad():
                    out = run()
                err = max_abs_error(out, ref)
                rows.append(dict(base, backend=b, max_diff=err, tol=tol, passed=err <= tol,
                                 seconds=time.perf_counter() - t0, note=f"{note}; naive {dtype} error {naive_err:.2g}"))
            except attnlib.BackendUnavailableError as e:
                rows.append(dict(base, backend=b, max_diff=None, tol=tol, passed=None,
                                 seconds=time.perf_counter() - t0, note=f"backend cannot serve this block: {e}"))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(base, backend=b, max_diff=None, tol=tol, passed=False,
                                 seconds=time.perf_counter() - t0, note=f"error: {type(e).__name__}: {e}"))
    return rows


def check_section(backends: list[str], device: str) -> int:
    """The ``models`` section of ``attnlib check`` (entry point ``attnlib.check_sections``): prints one row
    per (block, backend) and returns the number of failing rows."""
    print("\nmodels (reference blocks, float32: max |diff| / tolerance vs diffusers-transformers or math, float64)")
    failures = 0
    for row in model_parity_rows(list(backends), device=device):
        passed = row.get("passed")
        failures += passed is False
        diff = row.get("max_diff")
        diff_s = "n/a" if diff is None else f"{diff:.1e}/{row.get('tol', 0):.1e}"
        status = "n/a" if passed is None else ("ok" if passed else "FAIL")
        print(f"  {row['model']:34s} {row['backend']:9s} {diff_s:>18s} {status:4s}  {row.get('note', '')}")
    return failures


if __name__ == "__main__":  # python -m models_ref.parity [backend ...]
    import sys

    names = sys.argv[1:] or [r["name"] for r in attnlib.list_backends() if r["available"]]
    for r in model_parity_rows(names):
        diff = "-" if r["max_diff"] is None else f"{r['max_diff']:.3g}"
        tol = "-" if r["tol"] is None else f"{r['tol']:.3g}"
        print(f"{r['model']:30s} {r['backend']:8s} {diff:>10s} {tol:>10s} {str(r['passed']):6s} {r['note']}")
