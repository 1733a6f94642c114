"""Recompute after preemption (DESIGN.md §1): a KV cache far too small for the batch makes vLLM preempt requests and
later re-encode prompt + generated tokens in one prefill step.

Cyclic plan (tiny-w2), default: the re-encoding is exact (lckv_vllm/resume.py), so every request equals the
reference that never preempts — greedy tokens and logprobs.  With `LCKV_EXACT_RECOMPUTE=0` the same run uses the
m+b-pass approximation, and the oracle sees the difference (which shows the first check can fail).  Acyclic (CLA):
exact without any help.  The same engines also check the scheduler really preempted.
"""

import pytest

from conftest import BLOCK_SIZE, generate, random_prompt
from lckv_vllm.reference import ReferenceModel

N_REQ, PROMPT, GEN = 8, 24, 40
KV_TOKENS = 16 * BLOCK_SIZE  # 256 tokens for a batch that needs 8 * 64 = 512: preemption is certain
_runs: dict = {}


def preemptions(llm) -> int:
    return sum(int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


def run(engine, model_dir, preset, env=None):
    key = (preset, tuple(sorted((env or {}).items())))
    if key not in _runs:
        ref = ReferenceModel(model_dir(preset))
        kv_bytes = ref.plan.kv_bytes_per_token(ref.nkv, ref.hd, 4) * KV_TOKENS
        llm = engine(preset, env=env, kv_cache_memory_bytes=kv_bytes, max_num_seqs=N_REQ, max_model_len=128,
                     disable_log_stats=False)
        before = preemptions(llm)
        prompts = [random_prompt(PROMPT, seed=300 + i) for i in range(N_REQ)]
        results = generate(llm, prompts, max_tokens=GEN)
        worst, differ = 0.0, 0
        for p, (toks, lps, _) in zip(prompts, results):
            rtoks, rlps = ref.generate(p, GEN)
            differ += toks != rtoks
            n = next((i for i, (a, b) in enumerate(zip(toks, rtoks)) if a != b), len(toks))
            if n:  # logprobs compare only while the two agree on the tokens
                worst = max(worst, max(abs(a - b) for a, b in zip(lps[:n], rlps[:n])))
        _runs[key] = dict(preemptions=preemptions(llm) - before, differ=differ, worst=worst)
        print(f"{preset} {env or ''}: {_runs[key]}")
    return _runs[key]


def test_cyclic_recompute_after_preemption_is_exact(engine, model_dir):
    r = run(engine, model_dir, "tiny-w2")
    assert r["preemptions"] > 0
    assert r["differ"] == 0
    assert r["worst"] < 1e-3


def test_cyclic_approximate_recompute_is_seen_by_the_oracle(engine, model_dir):
    r = run(engine, model_dir, "tiny-w2", env={"LCKV_EXACT_RECOMPUTE": "0"})
    assert r["preemptions"] > 0
    assert r["differ"] > 0 or r["worst"] > 1e-3, r


def test_acyclic_recompute_is_exact_without_help(engine, model_dir):
    r = run(engine, model_dir, "tiny-cla")
    assert r["preemptions"] > 0
    assert r["differ"] == 0 and r["worst"] < 1e-3


def test_bad_switch_value_is_named(monkeypatch):
    from lckv_vllm.resume import exact_recompute_enabled

    monkeypatch.setenv("LCKV_EXACT_RECOMPUTE", "maybe")
    with pytest.raises(ValueError, match="LCKV_EXACT_RECOMPUTE='maybe'"):
        exact_recompute_enabled(object())
    monkeypatch.setenv("LCKV_EXACT_RECOMPUTE", "off")
    assert exact_recompute_enabled(object()) is False
    monkeypatch.delenv("LCKV_EXACT_RECOMPUTE")
    assert exact_recompute_enabled(object()) is True  # the default
    assert exact_recompute_enabled(type("C", (), {"lckv_exact_recompute": False})()) is False
