"""Deploy-time sharing patterns: `hf_overrides` replaces the checkpoint's `layer_types` (and the pass settings);
KV pages, weights and the served computation follow the active plan."""

import pytest

from conftest import BLOCK_SIZE, generate, model_of, random_prompt
from lckv_vllm.reference_model import ReferenceModel

LENGTHS = (1, 7, 30)


def _kv_tokens(llm):
    cfg = llm.llm_engine.vllm_config.cache_config
    return cfg.num_gpu_blocks * cfg.block_size


def test_override_changes_capacity_and_serves_the_override(engine, model_dir, caplog):
    """An identity checkpoint served as CLA-2 (0_0_2_2_4_4): half the KV per token, twice the capacity at one budget,
    the k/v weights of the new consumers unused, and outputs equal to the reference under the same override."""
    override = {"layer_types": "0_0_2_2_4_4"}
    budget = 48 << 20
    ident = engine("tiny-identity", kv_cache_memory_bytes=budget)
    cla = engine("tiny-identity", kv_cache_memory_bytes=budget, hf_overrides=override)
    model = model_of(cla)
    assert model.plan.layer_types == "0_0_2_2_4_4" and model.plan.producers == (0, 2, 4)
    assert model.config.layer_types_overridden_from == "0_1_2_3_4_5"
    assert not hasattr(model.model.layers[1].self_attn, "qkv_proj")  # a consumer keeps no k/v projection
    assert abs(_kv_tokens(cla) - 2 * _kv_tokens(ident)) <= 2 * BLOCK_SIZE
    prompts = [random_prompt(n, seed=200 + n) for n in LENGTHS]
    ref = ReferenceModel(model_dir("tiny-identity"), overrides=override)
    for (toks, lps, _), (rtoks, rlps) in zip(generate(cla, prompts, 12), [ref.generate(p, 12) for p in prompts]):
        assert toks == rtoks
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3
    # and the override really changes the model: the identity plan's outputs differ
    plain = ReferenceModel(model_dir("tiny-identity"))
    assert any(plain.generate(p, 12) != ref.generate(p, 12) for p in prompts)


def test_pass_settings_override(engine, model_dir):
    """forward_passes/backward_passes from hf_overrides reach the plan (m+b = 2 + 1 here) and the served output
    equals the reference with the same settings."""
    override = {"forward_passes": 2, "backward_passes": 1}
    llm = engine("tiny-w2", hf_overrides=override)
    assert model_of(llm).plan.num_passes == 3
    prompts = [random_prompt(n, seed=220 + n) for n in LENGTHS]
    ref = ReferenceModel(model_dir("tiny-w2"), overrides=override)
    for (toks, lps, _), (rtoks, rlps) in zip(generate(llm, prompts, 8), [ref.generate(p, 8) for p in prompts]):
        assert toks == rtoks
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3


def test_override_needing_missing_kv_weights_fails_naming_layer_and_override(model_dir):
    """tiny-w2 (0_4_4_4_4_5) has k/v projections for layers 0, 4, 5 only: serving it as identity would make layer 1 a
    producer without weights."""
    from vllm import LLM

    with pytest.raises(Exception) as e:
        LLM(str(model_dir("tiny-w2")), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=128,
            block_size=16, enforce_eager=True, hf_overrides={"layer_types": "0_1_2_3_4_5"})
    text = ""
    err = e.value
    while err is not None:
        text += str(err)
        err = err.__cause__ or err.__context__
    assert "layer 1 computes KV" in text and "override layer_types='0_1_2_3_4_5'" in text, text[:2000]


def test_invalid_override_is_named(model_dir):
    from vllm import LLM

    with pytest.raises(Exception, match="layer_types: entry 2 is '9'"):
        LLM(str(model_dir("tiny-identity")), dtype="float32", kv_cache_memory_bytes=16 << 20, max_model_len=128,
            block_size=16, enforce_eager=True, hf_overrides={"layer_types": "0_1_9_3_4_5"})
