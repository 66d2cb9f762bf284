"""transformers' own exporter works with attn_implementation="attnlib": the masks attnlib hands transformers survive
its object walks (cast_leaf_tensors), its decode-step merge (torch.cat along the query axis) and torch.export's
pytree flattening, and the exported prefill and decode graphs give the eager model's outputs."""
import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
exporters = pytest.importorskip("transformers.exporters.exporter_dynamo")
import attnlib.integrations.transformers as hf  # noqa: E402
from transformers.exporters import utils as export_utils  # noqa: E402

hf.register()


@pytest.fixture(autouse=True)
def _quiet_transformers():
    transformers.logging.set_verbosity_error()


def tiny_qwen2():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                   num_attention_heads=4, num_key_value_heads=2)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    model.set_attn_implementation(hf.NAME)
    return model


def prompts(length, seed=0):
    """A left-padded batch of two prompts."""
    ids = torch.randint(1, 97, (2, length), generator=torch.Generator().manual_seed(seed))
    am = torch.ones(2, length, dtype=torch.long)
    am[1, :2] = 0
    return dict(input_ids=ids, attention_mask=am)


def static_decode_masks():
    """The ``TransformersMask`` of two consecutive decode steps of a static-cache generate (one query each)."""
    pad = torch.tensor([[1] * 9, [0, 0] + [1] * 7]).bool()
    kw = dict(batch_size=2, kv_length=12, kv_offset=0, mask_function=transformers.masking_utils.causal_mask_function)
    return [hf.build_mask(**kw, q_length=1, q_offset=torch.tensor(n),
                          attention_mask=torch.cat([pad, torch.ones(2, n + 1 - 9, dtype=torch.bool)], 1))
            for n in (9, 10)]


def test_transformers_object_walkers_leave_the_mask_intact():
    """cast_leaf_tensors rewrote every attribute it found and hit attnlib's frozen dataclasses."""
    step = static_decode_masks()[0]
    inputs = {"attention_mask": {"full_attention": step}}
    out = export_utils.cast_leaf_tensors(inputs, dtype=torch.float16, device=torch.device("cpu"))
    assert out["attention_mask"]["full_attention"] is step and step.translation().kind == "key_padding"
    assert export_utils.get_leaf_tensors(inputs) == {}        # opaque to the walkers: the pytree node carries it


def test_merged_decode_steps_are_the_concatenated_dense_masks():
    """The exporter merges decode steps with _merge_step_masks (mask.dim(), then torch.cat along the queries)."""
    steps = static_decode_masks()
    merged = export_utils._merge_step_masks([{"full_attention": m} for m in steps])["full_attention"]
    assert isinstance(merged, hf.TransformersMask) and merged.shape == (2, 1, 2, 12)
    want = torch.cat([m.dense_tensor() for m in steps], dim=2)
    got, crop = merged.resolve(2, 2, 12)
    assert crop is None and got.kind == "dense" and torch.equal(got.mask.mask, want)
    assert torch.equal(merged.dense_tensor(), want)           # the merged arguments describe the same mask


def test_pytree_leaf_is_the_dense_mask_and_the_rebuilt_mask_runs_it():
    step = static_decode_masks()[0]
    leaves, spec = torch.utils._pytree.tree_flatten({"m": step})
    assert len(leaves) == 1 and torch.equal(leaves[0], step.dense_tensor())
    rebuilt = torch.utils._pytree.tree_unflatten(leaves, spec)["m"]
    got, crop = rebuilt.resolve(2, 1, 12)                     # sizes come from the call
    assert crop is None and got.mask.mask is leaves[0]
    q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 12, 8)
    want = hf.attnlib_attention_forward(torch.nn.Module(), q, k, k, step)[0]
    torch.testing.assert_close(hf.attnlib_attention_forward(torch.nn.Module(), q, k, k, rebuilt)[0], want)


def _export_and_compare(dynamic: bool):
    """The essence of transformers' `test_torch_export_generate_{static,dynamic}_static_cache`: capture prefill and
    decode from a static-cache generate, export each with transformers' DynamoExporter, compare with eager."""
    model = tiny_qwen2()
    config = transformers.GenerationConfig(cache_implementation="static", max_cache_len=16)
    stages = export_utils.decompose_for_generation(model, prompts(7), generation_config=config,
                                                   multi_token_decode=dynamic)
    exported = {}
    for name, (stage_model, inputs) in stages.items():
        with torch.no_grad():
            want = export_utils.get_leaf_tensors(stage_model(**copy.deepcopy(inputs)))
        program = exporters.DynamoExporter().export(stage_model, inputs,
                                                    config=exporters.DynamoConfig(dynamic=dynamic)).program
        with torch.no_grad():
            got = export_utils.get_leaf_tensors(program.module()(**copy.deepcopy(inputs)))
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-4, rtol=1e-4, msg=f"{name}: {key}")
        exported[name] = program
    return model, config, exported


def test_transformers_exporter_static_shapes_static_cache():
    _export_and_compare(dynamic=False)


def test_transformers_exporter_dynamic_shapes_static_cache():
    """One exported decode graph serves two merged steps and a single step, one prefill graph two prompt lengths:
    the mask leaf is dense, so the graph does not depend on padding or on the number of queries."""
    model, config, exported = _export_and_compare(dynamic=True)
    other = export_utils.decompose_for_generation(model, prompts(5, seed=1), generation_config=config)
    for name, (stage_model, inputs) in other.items():
        inputs = {k: v for k, v in inputs.items() if k not in ("use_cache", "return_dict")}   # as the exporter pops
        with torch.no_grad():
            want = stage_model(**copy.deepcopy(inputs)).logits
            got = exported[name].module()(**copy.deepcopy(inputs)).logits
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=name)
