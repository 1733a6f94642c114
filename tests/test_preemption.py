"""Recompute after preemption (docs/semantics.md): a KV cache far too small for the batch makes vLLM preempt requests and
later re-encode prompt + generated tokens in one prefill step.

Cyclic plan (tiny-w2) in whole-prompt mode with tolerance 0 (`LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0`): the
re-encoding is exact (lckv_vllm/engine/resume.py), so every request equals the reference that never preempts — greedy
tokens and logprobs.  With `LCKV_EXACT_RECOMPUTE=0` the same run uses the m+b-pass approximation, and the oracle sees
the difference (which shows the first check can fail).  Acyclic (CLA): exact without any help.  Under the defaults
(chunked prefill, prefix caching, adaptive passes) a trained model's re-encoding stays within the tolerance's bound
of the reference.  The same engines also check the scheduler really preempted.
"""

import pytest

from conftest import BLOCK_SIZE, TRAINED_W2, generate, random_prompt, text_prompts
from lckv_vllm.reference_model import ReferenceModel

N_REQ, PROMPT, GEN = 8, 24, 40
KV_TOKENS = 16 * BLOCK_SIZE  # 256 tokens for a batch that needs 8 * 64 = 512: preemption is certain
_runs: dict = {}


def preemptions(llm) -> int:
    return sum(int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")


WHOLE_PROMPT_EXACT = {"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}


def run(engine, model_dir, preset, env=None, prompts=None):
    key = (str(preset), tuple(sorted((env or {}).items())))
    if key not in _runs:
        path = preset if prompts is not None else model_dir(preset)
        ref = ReferenceModel(path)
        kv_bytes = ref.plan.kv_bytes_per_token(ref.nkv, ref.hd, 4) * KV_TOKENS
        llm = engine(str(path), env=env, kv_cache_memory_bytes=kv_bytes, max_num_seqs=N_REQ, max_model_len=128,
                     disable_log_stats=False)
        before = preemptions(llm)
        prompts = prompts or [random_prompt(PROMPT, seed=300 + i) for i in range(N_REQ)]
        results = generate(llm, prompts, max_tokens=GEN)
        tol = 0 if (env or {}).get("LCKV_PREFILL_TOL") == "0" else None
        worst, differ = 0.0, 0
        for p, (toks, lps, _) in zip(prompts, results):
            rtoks, rlps = ref.generate(p, GEN, tol=tol)
            differ += toks != rtoks
            n = next((i for i, (a, b) in enumerate(zip(toks, rtoks)) if a != b), len(toks))
            if n:  # logprobs compare only while the two agree on the tokens
                worst = max(worst, max(abs(a - b) for a, b in zip(lps[:n], rlps[:n])))
        _runs[key] = dict(preemptions=preemptions(llm) - before, differ=differ, worst=worst)
        print(f"{preset} {env or ''}: {_runs[key]}")
    return _runs[key]


def test_cyclic_recompute_after_preemption_is_exact(engine, model_dir):
    r = run(engine, model_dir, "tiny-w2", env=WHOLE_PROMPT_EXACT)
    assert r["preemptions"] > 0
    assert r["differ"] == 0
    assert r["worst"] < 1e-3


def test_cyclic_approximate_recompute_is_seen_by_the_oracle(engine, model_dir):
    r = run(engine, model_dir, "tiny-w2", env={**WHOLE_PROMPT_EXACT, "LCKV_EXACT_RECOMPUTE": "0"})
    assert r["preemptions"] > 0
    assert r["differ"] > 0 or r["worst"] > 1e-3, r


def test_trained_recompute_under_defaults_stays_within_the_tolerance_bound(engine, model_dir):
    """Defaults (chunked prefill, prefix caching, adaptive passes) on a trained LCKV model: preempted requests are
    re-encoded on top of whatever the prefix cache still holds, a split the first run did not have; a converged
    model does not notice (greedy tokens equal, logprobs within the adaptive bound)."""
    from lckv_vllm.settings import DEFAULT_PREFILL_TOL

    r = run(engine, model_dir, TRAINED_W2, prompts=text_prompts(TRAINED_W2, N_REQ, PROMPT))
    assert r["preemptions"] > 0
    assert r["differ"] == 0, r
    assert r["worst"] < 2 * DEFAULT_PREFILL_TOL, r


def test_acyclic_recompute_is_exact_without_help(engine, model_dir):
    r = run(engine, model_dir, "tiny-cla")
    assert r["preemptions"] > 0
    assert r["differ"] == 0 and r["worst"] < 1e-3


def test_bad_switch_value_is_named(monkeypatch):
    from lckv_vllm.settings import load_settings

    def exact(cfg=None):
        return load_settings(cfg).exact_recompute

    monkeypatch.setenv("LCKV_EXACT_RECOMPUTE", "maybe")
    with pytest.raises(ValueError, match="LCKV_EXACT_RECOMPUTE='maybe'"):
        exact()
    monkeypatch.setenv("LCKV_EXACT_RECOMPUTE", "off")
    assert exact() is False
    monkeypatch.delenv("LCKV_EXACT_RECOMPUTE")
    assert exact() is True  # the default
    assert exact(type("C", (), {"lckv_exact_recompute": False})()) is False


def test_plan_step_splits_a_mixed_step():
    """resume.plan_step on one step holding a fresh prompt (5 tokens), a resumed request (prompt 3 + 4 generated)
    and a decode (1 token after 10): the prompt parts first (one sub-step, passes = min(m+b, 5)), then one sub-step
    per generated position, each with its own context lengths, slots and block-table rows."""
    import torch

    from lckv_vllm.engine.attention.step import make_step
    from lckv_vllm.plan import LayerPlan
    from lckv_vllm.engine.resume import plan_step

    q_lens, ctx = [5, 7, 1], [0, 0, 10]
    qsl = torch.tensor([0, 5, 12, 13], dtype=torch.int32)
    seq_lens = torch.tensor([c + q for c, q in zip(ctx, q_lens)], dtype=torch.int32)
    block_table = torch.tensor([[7, 0], [3, 4], [9, 1]], dtype=torch.int32)
    slots = torch.arange(100, 113)
    md = make_step(num_actual_tokens=13, num_reqs=3, query_start_loc=qsl, seq_lens=seq_lens,
                   block_table=block_table, slot_mapping=slots, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    plan = LayerPlan.parse("0_4_4_4_4_5")  # m+b = 9
    md.prompt_lens = [5, 3, 4]  # the decode request's prompt had 4 tokens
    parts = plan_step(md, plan)
    assert [p.passes for p in parts] == [5, 1, 1, 1, 1]
    first = parts[0]
    assert first.rows.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]  # fresh prompt + the resumed request's prompt part
    assert first.step.query_start_loc.tolist() == [0, 5, 8] and first.step.seq_lens.tolist() == [5, 3]
    assert first.step.block_table.tolist() == [[7, 0], [3, 4]] and first.step.slot_mapping.tolist() == list(range(100, 108))
    g0 = parts[1]  # generated position 0: the resumed request's 4th token and the decode token
    assert g0.rows.tolist() == [8, 12] and g0.step.seq_lens.tolist() == [4, 11]
    assert g0.step.block_table.tolist() == [[3, 4], [9, 1]] and g0.step.max_query_len == 1
    assert [p.rows.tolist() for p in parts[2:]] == [[9], [10], [11]]
    assert [p.step.seq_lens.tolist() for p in parts[2:]] == [[5], [6], [7]]
    # nothing to re-encode: a plain prefill + decode step, and a decode-only step
    md.prompt_lens = [5, 7, 4]
    assert plan_step(md, plan) is None
    md.prompt_lens = None
    assert plan_step(md, plan) is None
