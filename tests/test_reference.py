"""The pure-torch reference against itself: the iterative encoding converges to token-by-token encoding exactly as
docs/semantics.md says, and chunk-by-chunk encoding behaves as documented."""

import pytest
import torch

from conftest import random_prompt
from lckv_vllm.reference_model import ReferenceModel

PRESETS = ["tiny-w2", "tiny-w10", "tiny-sandwich", "tiny-cla", "tiny-yoco", "tiny-identity", "tiny-lasagna"]


@pytest.fixture(scope="module")
def ref(model_dir):
    cache = {}

    def get(preset):
        if preset not in cache:
            cache[preset] = ReferenceModel(model_dir(preset))
        return cache[preset]

    return get


@pytest.mark.parametrize("preset", PRESETS)
def test_iterative_with_enough_passes_equals_sequential(ref, preset):
    r = ref(preset)
    toks = random_prompt(12, seed=1)
    seq = r.forward_sequential(toks)
    for passes in (12, 15):
        assert (r.forward_iterative(toks, passes) - seq).abs().max().item() <= 1e-5


@pytest.mark.parametrize("preset", ["tiny-w2", "tiny-w10", "tiny-lasagna"])
def test_k_passes_make_the_first_k_tokens_exact_and_no_more(ref, preset):
    r = ref(preset)
    toks = random_prompt(20, seed=2)
    seq = r.forward_sequential(toks)
    for k in (1, 3, r.plan.num_passes):
        it = r.forward_iterative(toks, k)
        err = (it - seq).abs().amax(-1)
        assert err[:k].max().item() <= 1e-5, (k, err)
        # beyond k tokens the iterative encoding is an approximation: it really differs
        assert err[k:].max().item() > 1e-7, (k, err)


def test_long_prompt_with_m_plus_b_passes_is_approximate_only_for_cyclic_plans(ref):
    toks = random_prompt(40, seed=3)
    for preset, cyclic in (("tiny-w2", True), ("tiny-cla", False), ("tiny-yoco", False)):
        r = ref(preset)
        err = (r.forward_iterative(toks) - r.forward_sequential(toks)).abs().amax(-1)
        assert err[: r.plan.num_passes].max() <= 1e-5
        assert (err.max().item() > 1e-3) == cyclic, (preset, err.max())


def test_first_pass_reads_zero_kv_for_the_current_tokens(ref):
    """One pass: the w2 middle layers see zeros where the top layer's K/V of the chunk will be.  With zero keys every
    visible score is 0, so for the 2nd token a middle layer's attention output is exactly zero (zero values)."""
    r = ref("tiny-w2")
    toks = random_prompt(6, seed=4)
    it1 = r.forward_iterative(toks, 1)
    # the same thing computed by hand: run the plan with the top layer's K/V replaced by zeros for all tokens
    cache = r.new_cache()
    for p in r.plan.producers:
        z = torch.zeros(len(toks), r.nkv, r.hd, dtype=r.dtype)
        cache.put(p, 0, z, z)
    pos = torch.arange(len(toks))
    h = r.w["model.embed_tokens.weight"][torch.tensor(toks)]
    for i in range(r.plan.num_layers):
        h = r._layer(i, h, pos, cache, 0)
    assert (r._logits(h) - it1).abs().max().item() <= 1e-9


def test_unit_chunks_equal_sequential_and_whole_chunk_equals_iterative(ref):
    r = ref("tiny-w2")
    toks = random_prompt(14, seed=5)
    seq = r.forward_sequential(toks)
    assert (r.forward_chunked(toks, [1] * 14) - seq).abs().max() <= 1e-5
    assert (r.forward_chunked(toks, [14]) - r.forward_iterative(toks)).abs().max() <= 1e-9
    # two chunks: the first 9 + 5 tokens, each chunk exact within m+b tokens -> equals sequential here
    assert (r.forward_chunked(toks, [9, 5]) - seq).abs().max() <= 1e-5


def test_strict_position_zero_is_exactly_zero_attention(ref):
    r = ref("tiny-w10")  # force_nodiag: every layer strict, so token 0 sees nothing in any layer
    tok = random_prompt(1, seed=6)
    h = r.w["model.embed_tokens.weight"][torch.tensor(tok)]
    expect = h.clone()
    for i in range(r.plan.num_layers):  # attention contributes 0, only the MLPs act
        p = f"model.layers.{i}."
        expect = expect + r._mlp(r._norm(expect, p + "post_attention_layernorm.weight"), i)
    assert (r.forward_sequential(tok) - r._logits(expect)).abs().max() <= 1e-9
