"""Does recompute-after-preemption change greedy outputs of a cyclic plan?  (docs/semantics.md)

vLLM 0.32 handles a full KV cache by preempting a running request and later re-encoding prompt + generated tokens
in one prefill step.  The plugin re-encodes exactly by default (lckv_vllm/engine/resume.py: prompt part iteratively, then
the generated tokens one at a time, as originally); `LCKV_EXACT_RECOMPUTE=0` selects the cheaper m+b-pass
approximation.  This script squeezes the KV budget until vLLM preempts, then compares every request's greedy tokens
and logprobs with the reference (`ReferenceModel.generate`, no preemption), for: tiny-w2 exact, tiny-w2
approximate, and an acyclic control (CLA, exact without help).  Engines use vLLM's default compiled mode.

    .venv/bin/python -m benchmarks.preemption      -> benchmarks/results/preemption.json
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, script_env, write_results

script_env()

HERE = Path(__file__).resolve().parent
N_REQ, PROMPT, GEN, BLOCK = 12, 40, 120, 16
KV_TOKENS = 640  # far below N_REQ * (PROMPT + GEN) = 1920: forces preemption


def preemptions(llm) -> int:
    total = 0
    for m in llm.get_metrics():
        if m.name == "vllm:num_preemptions":
            total += int(getattr(m, "value", 0))
    return total


def run(preset: str, work: Path, exact: bool = True) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lckv_vllm.tools.checkpoint import make_preset
    from lckv_vllm.reference_model import ReferenceModel

    path = make_preset(preset, work / preset)
    ref = ReferenceModel(path)
    plan = ref.plan
    kv_bytes = plan.kv_bytes_per_token(ref.nkv, ref.hd, 4) * KV_TOKENS
    os.environ["LCKV_EXACT_RECOMPUTE"] = "1" if exact else "0"
    # whole-prompt prefill with always m+b passes: the mode in which recompute is exact bit for bit (random-weight
    # models never converge, so under the chunked/adaptive defaults any split changes their outputs anyway)
    os.environ["LCKV_CHUNKED_PREFILL"], os.environ["LCKV_PREFILL_TOL"] = "0", "0"
    t0 = time.perf_counter()
    llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=kv_bytes, max_model_len=256, seed=0,
              block_size=BLOCK, max_num_seqs=N_REQ, disable_log_stats=False)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(3, 32000) for _ in range(PROMPT)] for _ in range(N_REQ)]
    startup = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(max_tokens=GEN, temperature=0, ignore_eos=True, logprobs=0), use_tqdm=False)
    gen_s = time.perf_counter() - t0
    n_pre = preemptions(llm)
    differ, first_div, worst = 0, [], 0.0
    for p, o in zip(prompts, outs):
        toks = list(o.outputs[0].token_ids)
        lps = [d[t].logprob for t, d in zip(toks, o.outputs[0].logprobs)]
        rtoks, rlps = ref.generate(p, GEN)
        n = next((i for i, (a, b) in enumerate(zip(toks, rtoks)) if a != b), len(toks))
        if n < len(toks):
            differ += 1
            first_div.append(n)
        if n:
            worst = max(worst, max(abs(a - b) for a, b in zip(lps[:n], rlps[:n])))
    del llm
    return {"preset": preset, "cyclic": plan.is_cyclic, "layer_types": plan.layer_types,
            "recompute": ("exact" if exact else "approximate (m+b passes)") if plan.is_cyclic else "exact (acyclic)",
            "requests": N_REQ, "prompt_len": PROMPT, "generated": GEN, "kv_capacity_tokens": KV_TOKENS,
            "preemptions": n_pre, "requests_differing_from_reference": differ,
            "first_divergence_positions": sorted(first_div),
            "max_abs_dlogprob_while_tokens_agree": worst, "generate_s": gen_s, "startup_s": startup}


def main() -> int:
    work = HERE.parent / "models" / "preemption"
    results = [run("tiny-w2", work), run("tiny-w2", work, exact=False), run("tiny-cla", work)]
    write_results(HERE / "results" / "preemption.json",
                  {"command": command_line("benchmarks.preemption"), "results": results}, indent=2)
    for r in results:
        print(f"{r['preset']:10s} {r['recompute']:26s} preemptions={r['preemptions']:3d} "
              f"requests differing from reference: {r['requests_differing_from_reference']}/{r['requests']} "
              f"first divergence at generated token {r['first_divergence_positions']}, "
              f"max |dlogprob| {r['max_abs_dlogprob_while_tokens_agree']:.2e}, generate {r['generate_s']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
