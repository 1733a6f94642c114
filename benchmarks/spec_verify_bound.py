"""How cheap can an exact speculative verify step be on a cyclic plan?  Counts of cyclic-segment runs, measured.

On a cyclic plan a token's K/V at the segment's top producer depends on the K/V of every earlier token, computed the
same way: so the k+1 tokens of a verify step form a dependency chain, and any exact verify (one token per sub-step,
as the engine does; or parallel passes over the drafts, after pass j the first j tokens are final) needs one
sequential run of the cyclic segment per token it keeps.  A verify step keeps a_r + 1 tokens of request r (its
accepted drafts and the token sampled after them); the requests of a step share the runs.  So, per verify step:

* `runs now` = max_r (drafts_r + 1): what the engine runs today (resume.py encodes every verify token);
* `bound` = max_r (a_r + 1): the fewest runs *any* exact verify could do, even one that knew the sampler's decision
  in advance and stopped there (an early stop at the first rejected draft, for instance);
* a decode step without drafts is one run either way, and plain decoding (no speculation) is one run per step.

The script serves the trained LCKV w2 example (layer_types 0_4_4_4_4_5: one cyclic segment of 4 of 6 layers) with
ngram drafts on the copying load of benchmarks/spec_decode.py (held-out passages written twice, greedy, 128 tokens),
at 1, 4 and 16 concurrent requests, k = 3, 4, 5, and without speculation, and counts over the decode phase (the steps
after every request has its first token).  It steps the engine itself and reads, per verify step, the draft counts and
the accepted tokens from vLLM's rejection sampler (a wrapper in the child process: measurement only, the plugin does
not patch the sampler).  Layer work per generated token, `(4 * runs + 2 * steps) / tokens` in layer runs (a run
takes the whole batch), is a cost model that counts runs, not rows: the run counts are exact, the model is not (a run
over more rows costs more; docs/features.md, "Speculative decoding on cyclic plans").

    .venv/bin/python -m benchmarks.spec_verify_bound [--tokens 128]
        -> benchmarks/results/spec_verify_bound.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from lckv_vllm.tools.harness import command_line, machine, pyplot, save_figure, script_env, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "examples" / "shakespeare-lckv-w2"
WORK = ROOT / "models" / "spec_verify_bound"
BATCHES = (1, 4, 16)
KS = (0, 3, 4, 5)
CYCLIC_LAYERS, OTHER_LAYERS = 4, 2  # of 0_4_4_4_4_5 (checked against the plan in main)


def child(args) -> None:
    """One engine, one setting: prints a JSON line of counts."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    script_env()  # in-process engine core: the wrapper below sees the sampler calls
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.sample import rejection_sampler as rs

    verify: list[tuple[int, int]] = []  # per verify step: (max drafts + 1, max tokens kept)
    forward = rs.RejectionSampler.forward

    def counting(self, metadata, draft_probs, logits, sampling_metadata):
        out = forward(self, metadata, draft_probs, logits, sampling_metadata)
        kept = (out.sampled_token_ids != rs.PLACEHOLDER_TOKEN_ID).sum(1)
        verify.append((metadata.max_spec_len + 1, int(kept.max())))
        return out

    rs.RejectionSampler.forward = counting
    spec = None
    if args.k:
        spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    llm = LLM(str(MODEL), dtype="float32", max_model_len=1024, seed=0, block_size=32, enforce_eager=True,
              kv_cache_memory_bytes=256 << 20, max_num_seqs=16, speculative_config=spec)
    engine = llm.llm_engine
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    prompts = json.loads(Path(args.prompts).read_text())[:args.batch]
    for i, p in enumerate(prompts):
        engine.add_request(str(i), TokensPrompt(prompt_token_ids=p), sp)
    have = {}  # request -> tokens so far
    steps = []  # decode-phase steps: (tokens produced, runs now, bound)
    while engine.has_unfinished_requests():
        before = len(verify)
        outs = engine.step()
        all_started = len(have) == len(prompts)
        new = 0
        for o in outs:
            n = len(o.outputs[0].token_ids)
            new += n - have.get(o.request_id, 0)
            have[o.request_id] = n
        if not all_started:
            continue  # a prefill step (it produces each request's first token)
        runs, bound = verify[before] if len(verify) > before else (1, 1)
        steps.append((new, runs, bound))
    tokens = sum(s[0] for s in steps)
    print("@@" + json.dumps({"decode_steps": len(steps), "verify_steps": sum(1 for s in steps if s[1] > 1),
                             "tokens": tokens, "runs_now": sum(s[1] for s in steps),
                             "runs_bound": sum(s[2] for s in steps)}), flush=True)
    os._exit(0)


def run_child(k: int, batch: int, prompts_file: Path, tokens: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.spec_verify_bound", "--child", "--k", str(k), "--batch", str(batch),
           "--prompts", str(prompts_file), "--tokens", str(tokens)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("@@")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"k={k} batch={batch} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[2:])


def layer_work(r: dict, runs: str) -> float:
    """Layer-runs per generated token: the cyclic segment `runs` times, the other layers once per step."""
    return (CYCLIC_LAYERS * r[runs] + OTHER_LAYERS * r["decode_steps"]) / r["tokens"]


def report(results: dict) -> str:
    lines = ["| requests | k | decode steps | tokens | cyclic runs now | bound (any exact verify) | plain decoding | "
             "layer runs / token now | at the bound | plain |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for b, runs in results["batches"].items():
        plain = runs["0"]
        for k, r in runs.items():
            if k == "0":
                continue
            lines.append(f"| {b} | {k} | {r['decode_steps']} | {r['tokens']} | {r['runs_now']} | {r['runs_bound']} | "
                         f"{plain['runs_now']} | {layer_work(r, 'runs_now'):.2f} | {layer_work(r, 'runs_bound'):.2f} | "
                         f"{layer_work(plain, 'runs_now'):.2f} |")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    labels, now, bound = [], [], []
    for b, runs in results["batches"].items():
        plain = layer_work(runs["0"], "runs_now")
        for k, r in runs.items():
            if k != "0":
                labels.append(f"{b} req\nk={k}")
                now.append(layer_work(r, "runs_now") / plain)
                bound.append(layer_work(r, "runs_bound") / plain)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], now, 0.4, label="verify today (every draft encoded)")
    ax.bar([x + 0.2 for x in xs], bound, 0.4, label="bound: any exact verify")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=7)
    ax.set_ylabel("layer work per token vs plain decoding")
    ax.set_title("ngram speculation on LCKV w2 (cyclic): layer work, measured step by step", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, RESULTS / "spec_verify_bound.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    from benchmarks.spec_decode import prompts
    from lckv_vllm.config import LCKVLlamaConfig
    from lckv_vllm.plan import plan_from_config

    plan = plan_from_config(LCKVLlamaConfig.from_pretrained(str(MODEL)))
    cyclic = sum(len(s.layers) for s in plan.segments if s.cyclic)
    assert (cyclic, plan.num_layers - cyclic) == (CYCLIC_LAYERS, OTHER_LAYERS), (cyclic, plan.num_layers)
    WORK.mkdir(parents=True, exist_ok=True)
    prompts_file = WORK / "prompts.json"
    prompts_file.write_text(json.dumps(prompts(max(BATCHES))))
    results = {"machine": machine(), "command": command_line("benchmarks.spec_verify_bound"),
               "settings": {"model": "examples/shakespeare-lckv-w2", "output_tokens": args.tokens, "dtype": "float32",
                            "block_size": 32, "greedy": True,
                            "ngram": {"prompt_lookup_min": 2, "prompt_lookup_max": 4},
                            "load": "held-out passages of 96 tokens written twice (as benchmarks/spec_decode.py)"},
               "batches": {}}
    for b in BATCHES:
        runs = {}
        for k in KS:
            runs[str(k)] = run_child(k, b, prompts_file, args.tokens)
            print(f"requests={b} k={k}: {runs[str(k)]}", flush=True)
        results["batches"][str(b)] = runs
    md = report(results)
    write_results(RESULTS / "spec_verify_bound.json", results, markdown=md)
    plot(results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
