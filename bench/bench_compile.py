"""Compiled hosts with attnlib inside vs the host's own SDPA path (pytest-benchmark; not run by CI).

    python -m pytest bench/bench_compile.py --benchmark-json=/tmp/compile.json
    python bench/report.py /tmp/compile.json > bench/results/compile_cpu.md

Groups (baseline first, measured in the same run), every variant ``torch.compile(model, fullgraph=True)``
with inductor, forward only, after warm-up:

* ``qwen2 tiny`` / ``qwen2 medium``: transformers ``Qwen2ForCausalLM`` with ``attn_implementation="sdpa"``
  (baseline) vs ``"attnlib"`` (auto backend: sdpa on CPU), a left-padded batch;
* ``qwenimage``: diffusers ``QwenImageTransformer2DModel`` with its native processor (baseline) vs attnlib's
  ``QwenImageAttnProcessor``, padded prompts.

Each variant also records in ``extra_info`` its compile time (first call after ``torch._dynamo.reset()``),
its graph count and graph breaks (``torch._dynamo.explain``), and the graphs compiled for five prompt
lengths under ``dynamic=True`` (recompiles).
"""
from __future__ import annotations

import time

import pytest
import torch

from harness import DEVICE, run

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

import attnlib.integrations.transformers as hf  # noqa: E402
from attnlib.integrations.diffusers import QwenImageAttnProcessor  # noqa: E402

QWEN2 = {
    "qwen2 tiny": (dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2), 2, 64),
    "qwen2 medium": (dict(vocab_size=1024, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2), 4, 256),
}


def _qwen2(name, impl):
    hf.register()
    cfg, batch, seq = QWEN2[name]
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg)).eval().to(DEVICE)
    model.set_attn_implementation(impl)
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    mask = torch.ones(batch, seq, dtype=torch.long, device=DEVICE)
    mask[1:, : seq // 4] = 0                       # left-padded prompts
    return model, dict(input_ids=ids, attention_mask=mask)


def _qwen_image(processor):
    torch.manual_seed(0)
    model = diffusers.QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=64, axes_dims_rope=(8, 12, 12)).eval().to(DEVICE)
    if processor == "attnlib":
        model.set_attn_processor(QwenImageAttnProcessor())
    g = torch.Generator().manual_seed(1)
    text = torch.ones(2, 32, dtype=torch.bool)
    text[1, 20:] = False
    frames, h, w = 1, 16, 16
    inputs = dict(hidden_states=torch.randn(2, frames * h * w, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 32, 64, generator=g), encoder_hidden_states_mask=text,
                  timestep=torch.full((2,), 0.5), img_shapes=[[(frames, h, w)]] * 2)
    return model, {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}


def _compile_facts(benchmark, model, inputs):
    torch._dynamo.reset()
    with torch.no_grad():
        ex = torch._dynamo.explain(model)(**inputs)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        compiled(**inputs)
    benchmark.extra_info.update(compile_s=round(time.perf_counter() - t0, 1), graphs=ex.graph_count,
                                graph_breaks=ex.graph_break_count)
    return compiled


def _recompiles(make, lengths=(40, 48, 56, 64, 72)):
    """Graphs compiled for five prompt lengths under dynamic=True (eager backend: counts, not codegen)."""
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    model, _ = make()
    compiled = torch.compile(model, dynamic=True, backend=counting)
    with torch.no_grad():
        for n in lengths:
            ids = torch.randint(0, 200, (2, n), generator=torch.Generator().manual_seed(n)).to(DEVICE)
            mask = torch.ones(2, n, dtype=torch.long, device=DEVICE)
            mask[1, :5] = 0
            compiled(input_ids=ids, attention_mask=mask)
    return len(graphs)


@pytest.mark.parametrize("impl", ["sdpa", "attnlib"])
@pytest.mark.parametrize("name", list(QWEN2))
def test_qwen2_compiled(benchmark, name, impl):
    model, inputs = _qwen2(name, impl)
    compiled = _compile_facts(benchmark, model, inputs)
    if name == "qwen2 tiny":
        benchmark.extra_info["graphs_for_5_lengths"] = _recompiles(lambda: _qwen2(name, impl))
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        with torch.no_grad():
            compiled(**inputs)

    def step():
        with torch.no_grad():
            compiled(**inputs)
    # the tiny model is sub-millisecond (dominated by per-call overhead): many rounds for a stable median
    run(benchmark, name, f"{impl} (compiled)", step, baseline=impl == "sdpa", rounds=400 if name == "qwen2 tiny" else 20,
        warmup_rounds=10)


@pytest.mark.parametrize("processor", ["native", "attnlib"])
def test_qwenimage_compiled(benchmark, processor):
    model, inputs = _qwen_image(processor)
    compiled = _compile_facts(benchmark, model, inputs)

    def step():
        with torch.no_grad():
            compiled(**inputs)
    run(benchmark, "qwenimage (256 image + 32 text tokens)", f"{processor} processor (compiled)", step,
        baseline=processor == "native", rounds=20)
