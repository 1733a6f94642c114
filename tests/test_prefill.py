"""Adaptive passes, chunked prefill and prefix caching for cyclic plans, and the convergence telemetry (prefill.py).

Random-weight checkpoints never converge, so the claims that matter ("a trained model stops early and stays within a
bound of the m+b-pass result"; "chunked = whole prompt") are checked on the committed trained LCKV model
(`examples/shakespeare-lckv-w2`, 6 layers, layers 1-4 read layer 4) with held-out Shakespeare prompts.

The bound: adaptive prefill stops a sequence once no token's producer K/V moved by more than `tol` (relative) in a
pass.  For a contracting iteration the K/V left over after stopping is then of order `tol`, and so is the effect on
log-probabilities: the largest |dlogprob| of any scored held-out token against the m+b-pass encoding, divided by the
tolerance, is 0.5-1.5 on both trained models over tolerances 0.001-0.3 (benchmarks/results/convergence.json), and
over every logit of every position about 1.3-3 (measured on the 6-layer model for tolerances 0.005-0.3).  The tests
use |dlogprob| <= BOUND x tol with BOUND = 4, on every logit.
"""

import logging
import math

import pytest
import torch

from conftest import TRAINED_W2, generate, generate_staggered, model_of, random_prompt, text_prompts
from lckv_vllm.engine.prefill import row_change
from lckv_vllm.reference_model import ReferenceModel
from lckv_vllm.settings import DEFAULT_PREFILL_TOL, load_settings

BOUND = 4.0
LENGTHS = (30, 64, 128, 200)
_ref = {}


def trained_ref() -> ReferenceModel:
    if "w2" not in _ref:
        _ref["w2"] = ReferenceModel(TRAINED_W2)
    return _ref["w2"]


def prompts_of(lengths, offset=0):
    out, at = [], offset
    for n in lengths:
        out.append(text_prompts(TRAINED_W2, 1, n, offset=at)[0])
        at += n
    return out


def worst_dlogprob(a, b):
    return max(abs(x - y) for x, y in zip(a, b))


# ---- settings ------------------------------------------------------------------------------------------------------
def test_tolerance_setting(monkeypatch):
    monkeypatch.delenv("LCKV_PREFILL_TOL", raising=False)
    assert load_settings().prefill_tol == DEFAULT_PREFILL_TOL and load_settings().adaptive
    assert load_settings(type("C", (), {"lckv_prefill_tol": 0.01})()).prefill_tol == 0.01
    monkeypatch.setenv("LCKV_PREFILL_TOL", "0")
    s = load_settings(type("C", (), {"lckv_prefill_tol": 0.01})())  # the environment wins
    assert s.prefill_tol == 0 and not s.adaptive
    for bad in ("abc", "-0.1", "nan", "inf"):
        monkeypatch.setenv("LCKV_PREFILL_TOL", bad)
        with pytest.raises(ValueError, match=f"LCKV_PREFILL_TOL={bad!r}"):
            load_settings()
    monkeypatch.delenv("LCKV_PREFILL_TOL")
    with pytest.raises(ValueError, match="lckv_prefill_tol=True"):
        load_settings(type("C", (), {"lckv_prefill_tol": True})())
    monkeypatch.setenv("LCKV_PASS_ECONOMY", "0")  # every pass over every row: no adaptive stop
    assert not load_settings().adaptive


def test_row_change_matches_the_reference_and_sums_over_tensor_parallel_ranks():
    torch.manual_seed(0)
    new, old = torch.randn(2, 7, 16, dtype=torch.float64), torch.randn(2, 7, 16, dtype=torch.float64)
    new[:, 3] = 0
    old[:, 3] = 0  # an all-zero token that did not move: change 0, not NaN
    expect = ReferenceModel._row_change(new, old)
    got = row_change(new, old)
    assert torch.allclose(got.double(), expect, rtol=1e-5) and float(got[3]) == 0.0
    # two "ranks" holding half of the heads each: summing squared norms gives the full-head change
    halves = [(new[..., :8], old[..., :8]), (new[..., 8:], old[..., 8:])]
    parts = []

    def reduce(sq):
        parts.append(sq)
        return sq if len(parts) < 2 else parts[0] + parts[1]

    row_change(*halves[0], tp_reduce=reduce)
    tp = row_change(*halves[1], tp_reduce=reduce)
    assert torch.allclose(tp.double(), expect, rtol=1e-5)


# ---- the oracle ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["trained", "random"])
def test_adaptive_encoding_of_a_prefix_does_not_depend_on_what_follows(which, model_dir):
    """The stop rule is causal: a prompt's first n tokens get the same K/V (and logits) as the n-token prompt alone.
    That is what makes prefix-cache hits consistent for cyclic plans."""
    if which == "trained":
        ref, toks = trained_ref(), prompts_of([120])[0]
    else:
        ref, toks = ReferenceModel(model_dir("tiny-w2")), random_prompt(120, seed=7)
    for tol in (0.2, DEFAULT_PREFILL_TOL):
        full = ref.forward_iterative(toks, tol=tol)
        for n in (33, 80):
            assert (ref.forward_iterative(toks[:n], tol=tol) - full[:n]).abs().max().item() <= 1e-9


def test_trained_model_stops_early_within_the_bound():
    ref = trained_ref()
    for toks in prompts_of((128, 200), offset=1000):
        exact = torch.log_softmax(ref.forward_iterative(toks, tol=0), -1)
        for tol in (0.2, DEFAULT_PREFILL_TOL, 0.01):
            stats: list = []
            got = torch.log_softmax(ref.forward_chunk(toks, ref.new_cache(), tol=tol, stats=stats), -1)
            passes, last = stats[0]
            assert passes < ref.plan.num_passes and last <= tol, (tol, stats)
            worst = (got - exact).abs().max().item()  # every logit of every position, not only the sampled ones
            assert worst <= BOUND * tol, (tol, worst)


# ---- the engine ----------------------------------------------------------------------------------------------------
def test_trained_model_defaults_equal_the_adaptive_reference_and_stay_within_the_bound(engine):
    """Defaults (chunked prefill, prefix caching, adaptive passes): the engine's greedy tokens and logprobs equal the
    adaptive reference, stay within BOUND x tol of the m+b-pass result, and the prefills used fewer than m+b passes."""
    llm = engine(str(TRAINED_W2))
    ref = trained_ref()
    prompts = prompts_of(LENGTHS)
    before = model_of(llm).model.prefill.stats.snapshot()  # the engine is shared: count this test's prefills only
    results = generate(llm, prompts, max_tokens=16)
    for p, (toks, lps, _) in zip(prompts, results):
        rtoks, rlps = ref.generate(p, 16)
        assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3
        etoks, elps = ref.generate(p, 16, tol=0)
        assert toks == etoks and worst_dlogprob(lps, elps) <= BOUND * DEFAULT_PREFILL_TOL
    stats = model_of(llm).model.prefill.stats.snapshot()
    mb = ref.plan.num_passes
    prefills = stats["prefills"] - before["prefills"]
    assert prefills == len(prompts) and stats["unconverged"] == before["unconverged"]
    passes = [a - b for a, b in zip(stats["passes"], before["passes"])]
    mean = sum(k * n for k, n in enumerate(passes)) / prefills
    assert mean < mb - 2, stats  # the long prompts stopped well before m+b = 9
    assert stats["last_change"] is not None and stats["last_change"] <= DEFAULT_PREFILL_TOL


def test_trained_model_chunked_and_prefix_hits_equal_whole_prompt_within_the_bound(engine):
    """The scheduler splits prompts into 32-token chunks, and a second prompt reuses a cached prefix: both equal the
    whole-prompt m+b-pass encoding within the bound (and the chunked reference exactly)."""
    llm = engine(str(TRAINED_W2), max_num_batched_tokens=32, max_num_seqs=4)
    ref = trained_ref()
    long = prompts_of([150], offset=2000)[0]
    toks, lps, _ = generate(llm, [long])[0]
    rtoks, rlps = ref.generate(long, 16, chunk_sizes=[32, 32, 32, 32, 22])
    assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3
    etoks, elps = ref.generate(long, 16, tol=0)
    assert toks == etoks and worst_dlogprob(lps, elps) <= BOUND * DEFAULT_PREFILL_TOL
    other = long[:100] + prompts_of([40], offset=2500)[0]
    toks, lps, hit = generate(llm, [other])[0]
    assert hit == 96  # six full 16-token blocks of the shared 100 tokens
    etoks, elps = ref.generate(other, 16, tol=0)
    assert toks == etoks and worst_dlogprob(lps, elps) <= BOUND * DEFAULT_PREFILL_TOL


def test_non_converging_checkpoint_is_counted_and_warned_once(engine, caplog):
    """A random-weight model does not converge: prompts longer than m+b that still move after m+b passes are counted
    (lckv-serve shows them in /metrics) and the engine warns once, saying how to get split-independent outputs."""
    llm = engine("tiny-w2", max_num_seqs=4)
    with caplog.at_level(logging.WARNING, logger="lckv_vllm"):
        generate(llm, [random_prompt(120, seed=400 + i) for i in range(3)], max_tokens=2)
        generate(llm, [random_prompt(120, seed=410)], max_tokens=2)
    stats = model_of(llm).model.prefill.stats.snapshot()
    assert stats["unconverged"] >= 1 and stats["passes"][9] >= 1, stats
    warnings = [r for r in caplog.records if "did not converge" in r.getMessage()]
    assert len(warnings) == 1
    assert "LCKV_CHUNKED_PREFILL=0" in warnings[0].getMessage() and "LCKV_PREFILL_TOL=0" in warnings[0].getMessage()
    assert math.isfinite(stats["last_change"])


# ---- prefill blocks ------------------------------------------------------------------------------------------------
def test_block_setting(monkeypatch):
    from lckv_vllm.settings import DEFAULT_PREFILL_BLOCK

    monkeypatch.delenv("LCKV_PREFILL_BLOCK", raising=False)
    monkeypatch.delenv("LCKV_CHUNKED_PREFILL", raising=False)
    assert load_settings().block == DEFAULT_PREFILL_BLOCK > 0
    assert load_settings(type("C", (), {"lckv_prefill_block": 32})()).block == 32
    monkeypatch.setenv("LCKV_CHUNKED_PREFILL", "0")
    assert load_settings().block == 0  # whole-prompt mode: one block, today's m+b-pass reproduction
    monkeypatch.delenv("LCKV_CHUNKED_PREFILL")
    monkeypatch.setenv("LCKV_PREFILL_BLOCK", "0")
    assert load_settings(type("C", (), {"lckv_prefill_block": 32})()).block == 0  # the environment wins
    for bad in ("abc", "-16", "1.5"):
        monkeypatch.setenv("LCKV_PREFILL_BLOCK", bad)
        with pytest.raises(ValueError, match=f"LCKV_PREFILL_BLOCK={bad!r}"):
            load_settings()
    monkeypatch.delenv("LCKV_PREFILL_BLOCK")
    with pytest.raises(ValueError, match="lckv_prefill_block"):
        load_settings(type("C", (), {"lckv_prefill_block": 2.5})())


@pytest.mark.parametrize("which", ["trained", "random"])
def test_reference_blocks_are_aligned_chunks(which, model_dir):
    """A block is a chunk of its own, cut at multiples of the block size counted from the sequence start (not from
    the chunk's start), so a prefix's encoding depends only on where the scheduler split it."""
    if which == "trained":
        ref, toks = trained_ref(), prompts_of([150], offset=3000)[0]
    else:
        ref, toks = ReferenceModel(model_dir("tiny-w2")), random_prompt(150, seed=11)
    for tol in (0.0, DEFAULT_PREFILL_TOL):
        cache = ref.new_cache()
        a = ref.forward_chunk(toks[:40], cache, tol=tol, block=0)
        b = ref.forward_chunk(toks[40:], cache, tol=tol, block=32)  # cut at 64, 96, 128
        want = ref.forward_chunked(toks, [40, 24, 32, 32, 22], tol=tol, block=0)
        assert (torch.cat([a, b]) - want).abs().max().item() == 0
        # the whole prompt in blocks of 32 differs from one block (a long enough prompt is not exact either way)
        assert (ref.forward_chunked(toks, [150], tol=tol, block=32)
                - ref.forward_iterative(toks, tol=tol)).abs().max().item() > 1e-6


def test_engine_blocks_equal_the_reference_with_batches_decodes_and_scheduler_chunks(engine, model_dir):
    """Blocks of 16 on a random-weight model (no early stop, so every block runs its m+b passes and any slip in the
    rounds shows): prompts of several lengths in one batch, prompts arriving while others decode (decode rows in the
    first round), and the scheduler's 24-token chunks cutting across blocks; all equal the reference's blocks."""
    ref = ReferenceModel(model_dir("tiny-w2"))
    env = {"LCKV_PREFILL_BLOCK": "16"}
    llm = engine("tiny-w2", env=env, max_num_seqs=8)
    prompts = [random_prompt(n, seed=500 + n) for n in (5, 16, 17, 40, 70)]
    for p, (toks, lps, _) in zip(prompts, generate(llm, prompts, max_tokens=8)):
        rtoks, rlps = ref.generate(p, 8, block=16)
        assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3
    arrivals = [(0, random_prompt(30, seed=520)), (3, random_prompt(45, seed=521)), (5, random_prompt(33, seed=522))]
    for (_, p), (toks, lps) in zip(arrivals, generate_staggered(llm, arrivals, max_tokens=8)):
        rtoks, rlps = ref.generate(p, 8, block=16)
        assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3
    chunked = engine("tiny-w2", env=env, max_num_batched_tokens=24, max_num_seqs=1)
    p = random_prompt(70, seed=530)
    toks, lps, _ = generate(chunked, [p], max_tokens=8)[0]
    rtoks, rlps = ref.generate(p, 8, chunk_sizes=[24, 24, 22], block=16)
    assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3


def test_trained_model_blocks_save_passes_within_the_bound(engine):
    """On the trained model, blocks of 32: the engine equals the blocked reference, stays within the bound of the
    m+b-pass whole-prompt encoding, and its segments recompute fewer rows than one block per prompt does."""
    ref = trained_ref()
    prompts = prompts_of((200, 160), offset=3200)
    segment = {i for seg in ref.plan.segments if seg.cyclic for i in seg.layers}
    rows = {0: 0, 32: 0}
    layer = ref._layer
    for block in rows:
        def counting(i, h, *a, _b=block):
            rows[_b] += h.shape[0] if i in segment else 0
            return layer(i, h, *a)
        ref._layer = counting
        try:
            for p in prompts:
                ref.forward_chunk(p, ref.new_cache(), tol=DEFAULT_PREFILL_TOL, block=block)
        finally:
            del ref._layer
    assert rows[32] < 0.9 * rows[0], rows
    llm = engine(str(TRAINED_W2), env={"LCKV_PREFILL_BLOCK": "32"})
    before = model_of(llm).model.prefill.stats.snapshot()
    for p, (toks, lps, _) in zip(prompts, generate(llm, prompts, max_tokens=16)):
        rtoks, rlps = ref.generate(p, 16, block=32)
        assert toks == rtoks and worst_dlogprob(lps, rlps) < 1e-3
        etoks, elps = ref.generate(p, 16, tol=0, block=0)
        assert toks == etoks and worst_dlogprob(lps, elps) <= BOUND * DEFAULT_PREFILL_TOL
    after = model_of(llm).model.prefill.stats.snapshot()
    assert after["prefills"] - before["prefills"] == len(prompts)  # one prefill per request, however many blocks
    # the engine's count of recomputed rows is the reference's (same rule, same rows)
    engine_rows = after["recomputed_tokens"] - before["recomputed_tokens"]
    assert engine_rows == rows[32] / len(segment), (engine_rows, rows)
