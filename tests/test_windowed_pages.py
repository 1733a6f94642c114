"""Windowed pages: a producer whose every reader is sliding-window gets vLLM's sliding-window KV spec, so its pages
that fall out of the window are freed; the others keep full pages.  Plans mixing both run with several KV-cache
groups (vLLM's hybrid KV cache manager), one step object per group.

Oracles: the float64 reference (greedy tokens, |dlogprob| < 1e-3) and the same engine with full pages for every
producer (`LCKV_WINDOWED_PAGES=0`); the blocks a streaming sequence holds in each
sliding-window group are read from vLLM's KV cache manager after every step.
"""

from __future__ import annotations

import math

import pytest

from conftest import BLOCK_SIZE, generate, random_prompt, stream_watching_blocks
from lckv_vllm.plan import LayerPlan
from lckv_vllm.reference_model import ReferenceModel
from lckv_vllm.tools.checkpoint import make_preset

WINDOW = 8
# name -> (preset it is built from, layer_types, windowed producers, full producers)
PLANS = {
    # YOCO-like: the lower half slides over its own KV; the upper half reads layer 2, which is sliding itself but
    # read by full-attention layers, so its pages stay full
    "yoco": ("tiny-yoco", "0s_1s_2s_2_2_2", (0, 1), (2,)),
    # sliding-window attention everywhere (Mistral-style): one group, every producer windowed
    "swa": ("tiny-identity", "0s_1s_2s_3s_4s_5s", (0, 1, 2, 3, 4, 5), ()),
    # a cyclic LCKV plan whose condensed layer slides: layers 1-4 read layer 4 within the window (iterative
    # prefill over two KV-cache groups)
    "lckv-sliding": ("tiny-w2", "0_4s_4s_4s_4s_5", (4,), (0, 5)),
}
LENGTHS = (1, 5, 9, 30, 70)  # m+b = 9, window 8, block 16
MAX_DLOGPROB = 1e-3


@pytest.fixture(scope="module")
def plan_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("windowed")
    return {name: make_preset(base, root / name, layer_types=lt, sliding_window=WINDOW)
            for name, (base, lt, _, _) in PLANS.items()}


def test_page_window_comes_from_the_readers():
    for name, (_, lt, windowed, full) in PLANS.items():
        plan = LayerPlan.parse(lt, 6, sliding_window=WINDOW)
        assert plan.windowed_producers == windowed, name
        assert [p for p in plan.producers if plan.page_window(p) is None] == list(full), name
    # one full-attention reader keeps a producer's pages full, even when the producer itself slides
    plan = LayerPlan.parse("0s_1s_1", 3, sliding_window=WINDOW)
    assert plan.readers(1) == (1, 2) and plan.page_window(1) is None and plan.page_window(0) == WINDOW
    with pytest.raises(ValueError, match="keeps no KV"):
        plan.page_window(2)


def _scheduler(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def _groups(llm) -> list[tuple[str, list[int]]]:
    """(spec class, layer indices) per KV-cache group of the engine."""
    cfg = _scheduler(llm).kv_cache_config
    return [(type(g.kv_cache_spec).__name__, sorted(int(n.split(".")[2]) for n in g.layer_names))
            for g in cfg.kv_cache_groups]


@pytest.mark.parametrize("name", list(PLANS))
def test_windowed_pages_match_reference_and_full_pages(engine, plan_dirs, name):
    _, _, windowed, full = PLANS[name]
    path = str(plan_dirs[name])
    llm = engine(path)
    groups = _groups(llm)
    assert sorted(i for kind, layers in groups if kind == "SlidingWindowSpec" for i in layers) == list(windowed)
    assert sorted(i for kind, layers in groups if kind == "FullAttentionSpec" for i in layers) == list(full)
    _check_capacity_metric(llm)
    prompts = [random_prompt(n, seed=300 + n) for n in LENGTHS]
    got = generate(llm, prompts, max_tokens=24)
    ref = ReferenceModel(path)
    worst = 0.0
    for (toks, lps, _), p in zip(got, prompts):
        rtoks, rlps = ref.generate(p, 24)
        assert toks == rtoks
        worst = max(worst, max(abs(a - b) for a, b in zip(lps, rlps)))
    assert worst < MAX_DLOGPROB, worst
    # full pages for every producer (one group): the same tokens, the same logprobs up to float32 rounding
    full_llm = engine(path, env={"LCKV_WINDOWED_PAGES": "0"})
    assert [kind for kind, _ in _groups(full_llm)] == ["FullAttentionSpec"]
    for (toks, lps, _), (ftoks, flps, _) in zip(got, generate(full_llm, prompts, max_tokens=24)):
        assert toks == ftoks
        assert max(abs(a - b) for a, b in zip(lps, flps)) < 1e-4


def _check_capacity_metric(llm):
    """lckv-serve's `lckv_kv_capacity_tokens` is vLLM's group-aware KV cache size: every token takes a block in each
    KV-cache group, so with several groups it is below the pool's blocks x block size."""
    from vllm.v1.core.kv_cache_utils import get_kv_cache_capacity

    from lckv_vllm.server.metrics import KVLayout

    vc, cfg = llm.llm_engine.vllm_config, _scheduler(llm).kv_cache_config
    capacity = KVLayout.from_vllm_config(vc).capacity_tokens
    assert capacity == get_kv_cache_capacity(vc, cfg)[0]
    if len(cfg.kv_cache_groups) > 1:
        assert capacity < cfg.num_blocks * BLOCK_SIZE


@pytest.mark.parametrize("name", ["yoco", "lckv-sliding"])
def test_streaming_sequence_holds_a_window_of_blocks(engine, plan_dirs, name):
    """A sequence streaming 40x the window: each sliding-window group holds at most ceil((W - 1) / block) + 1 blocks
    after every step, the full-attention groups grow with the sequence, and nothing is preempted."""
    llm = engine(str(plan_dirs[name]))
    sched = _scheduler(llm)
    kinds = [type(g.kv_cache_spec).__name__ for g in sched.kv_cache_config.kv_cache_groups]
    bound = math.ceil((WINDOW - 1) / BLOCK_SIZE) + 1
    n_prompt, n_gen = 20, 40 * WINDOW
    finished, most, preemptions = stream_watching_blocks(llm, random_prompt(n_prompt, seed=7), n_gen)
    assert finished is not None and len(finished.outputs[0].token_ids) == n_gen
    assert finished.num_cached_tokens in (0, None)
    for kind, held in zip(kinds, most):
        if kind == "SlidingWindowSpec":
            assert 1 <= held <= bound, (kind, held, bound)
        else:  # full pages: the whole sequence (at its longest)
            assert held == math.ceil((n_prompt + n_gen - 1) / BLOCK_SIZE), (kind, held)
    assert sched.kv_cache_manager.block_pool.get_num_free_blocks() == sched.kv_cache_config.num_blocks - 1
    assert preemptions == 0  # the scheduler never had to recompute the sequence


def test_recompute_after_preemption_with_windowed_pages_is_exact(engine, plan_dirs):
    """The cyclic plan over two KV-cache groups, its KV cache far too small: preempted requests are re-encoded
    exactly (whole-prompt mode, tolerance 0), part by part across both groups' sub-steps."""
    from test_preemption import N_REQ, PROMPT, WHOLE_PROMPT_EXACT, run

    prompts = [random_prompt(PROMPT, seed=500 + i) for i in range(N_REQ)]
    r = run(engine, None, plan_dirs["lckv-sliding"], env=WHOLE_PROMPT_EXACT, prompts=prompts)
    assert r["preemptions"] > 0, r
    assert r["differ"] == 0 and r["worst"] < 1e-3, r
