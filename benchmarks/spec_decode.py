"""Speculative decoding on LCKV plans: decode throughput and acceptance with ngram drafts against no speculation.

A load where drafts hit: each prompt is a held-out passage written twice, so greedy continuations copy from the
prompt.  Per engine, `--requests` such prompts generate `--tokens` greedy tokens each, all submitted at once
(offline `LLM.generate`); output tokens/s over the whole call after one warm-up call, best of `--repeats`.
Engines: the trained identity example, the same weights served as CLA-2 (`0_0_2_2_4_4`, a deploy-time override:
acyclic sharing), the trained LCKV w2 example (cyclic), and vLLM's own Llama on the identity weights
(`export-llama`), each with no speculation and with ngram k = 3, 4, 5 (prompt lookup 2-4).  Every ratio pairs an
engine with its own no-speculation run in the same script run.

One process per engine: in vLLM 0.32 on CPU, after one ngram engine no further engine starts in the same process
(tests/spec_run.py says why).

    .venv/bin/python -m benchmarks.spec_decode [--requests 16] [--tokens 128] [--repeats 3]
        -> benchmarks/results/spec_decode.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, machine, pyplot, save_figure, script_env, write_results

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
EXAMPLES = ROOT / "examples"
WORK = ROOT / "models" / "spec_decode"
HELD_OUT = RESULTS / "lm_eval_heldout.txt"  # held out for the trained examples
ENGINES = {  # name -> (checkpoint, hf_overrides)
    "identity": ("shakespeare-identity", None),
    "cla-2": ("shakespeare-identity", {"layer_types": "0_0_2_2_4_4"}),
    "lckv-w2": ("shakespeare-lckv-w2", None),
    "vllm-llama": ("llama", None),
}
KS = (0, 3, 4, 5)


def child(args) -> None:
    """One engine, one setting: prints a JSON line."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    script_env()
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    spec = None
    if args.k:
        spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
    llm = LLM(args.model, dtype="float32", max_model_len=1024, seed=0, block_size=32, enforce_eager=True,
              kv_cache_memory_bytes=256 << 20, max_num_seqs=16, speculative_config=spec, disable_log_stats=False,
              hf_overrides=json.loads(args.overrides) or None)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in json.loads(Path(args.prompts).read_text())]
    sp = SamplingParams(max_tokens=args.tokens, temperature=0, ignore_eos=True)
    llm.generate(prompts[:2], sp, use_tqdm=False)  # warm-up

    def counters() -> dict:
        return {m.name: int(m.value) for m in llm.get_metrics() if m.name.startswith("vllm:spec_decode_num")
                and hasattr(m, "value")}

    best, outputs, c0, c1 = None, None, counters(), None
    for _ in range(args.repeats):
        t = time.perf_counter()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        dt = time.perf_counter() - t
        if best is None or dt < best:
            best, outputs = dt, [list(o.outputs[0].token_ids) for o in outs]
    c1 = counters()
    d = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
    tokens = sum(len(o) for o in outputs)
    print("@@" + json.dumps({"seconds": best, "output_tokens": tokens, "tok_s": tokens / best,
                             "draft_tokens": d.get("vllm:spec_decode_num_draft_tokens", 0),
                             "accepted_tokens": d.get("vllm:spec_decode_num_accepted_tokens", 0),
                             "outputs": outputs}), flush=True)
    os._exit(0)


def prompts(count: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    from lckv_vllm.config import register_hf_config

    register_hf_config()
    tok = AutoTokenizer.from_pretrained(str(EXAMPLES / "shakespeare-identity"))
    ids = tok.encode(HELD_OUT.read_text(encoding="utf-8"))
    n = 96
    return [ids[i * n:(i + 1) * n] * 2 for i in range(count)]


def run_child(model: Path, overrides, k: int, prompts_file: Path, args) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.spec_decode", "--child", "--model", str(model), "--k", str(k),
           "--prompts", str(prompts_file), "--tokens", str(args.tokens), "--repeats", str(args.repeats),
           "--overrides", json.dumps(overrides or {})]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("@@")), None)
    if r.returncode != 0 or line is None:
        raise RuntimeError(f"{model} k={k} failed:\n{r.stderr[-3000:]}")
    return json.loads(line[2:])


def report(results: dict) -> str:
    lines = ["| engine | k | output tok/s | vs no speculation | drafts accepted | same tokens as k = 0 |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for name, runs in results["engines"].items():
        base = runs["0"]["tok_s"]
        for k, r in runs.items():
            acc = f"{r['accepted_tokens'] / r['draft_tokens']:.2f}" if r["draft_tokens"] else "-"
            lines.append(f"| {name} | {k} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {acc} | "
                         f"{'yes' if r['same_as_k0'] else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(results["engines"])
    width = 0.8 / len(KS)
    for j, k in enumerate(KS):
        ys = [results["engines"][n][str(k)]["tok_s"] / results["engines"][n]["0"]["tok_s"] for n in names]
        ax.bar([i + (j - (len(KS) - 1) / 2) * width for i in range(len(names))], ys, width,
               label="no speculation" if k == 0 else f"ngram k = {k}")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("output tok/s vs no speculation (same engine, same run)")
    ax.set_title("ngram speculation on a copying load (CPU, 2 cores, fp32)", fontsize=10)
    ax.legend(fontsize=8)
    save_figure(fig, RESULTS / "spec_decode.png", dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--prompts", help=argparse.SUPPRESS)
    ap.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    llama = WORK / "llama"
    if not (llama / "config.json").exists():
        from lckv_vllm.tools.checkpoint import export_llama

        export_llama(EXAMPLES / "shakespeare-identity", llama)
    prompts_file = WORK / "prompts.json"
    prompts_file.write_text(json.dumps(prompts(args.requests)))
    results = {"machine": machine(), "command": command_line("benchmarks.spec_decode"),
               "settings": {"requests": args.requests, "prompt_tokens": 192, "output_tokens": args.tokens,
                            "repeats": args.repeats, "dtype": "float32", "block_size": 32, "enforce_eager": True,
                            "ngram": {"prompt_lookup_min": 2, "prompt_lookup_max": 4},
                            "load": "held-out passages of 96 tokens written twice (lm_eval_heldout.txt)"},
               "engines": {}}
    for name, (ckpt, overrides) in ENGINES.items():
        model = llama if ckpt == "llama" else EXAMPLES / ckpt
        runs = {}
        for k in KS:
            print(f"{name} k={k}", flush=True)
            runs[str(k)] = run_child(model, overrides, k, prompts_file, args)
            print(f"  {runs[str(k)]['tok_s']:.1f} tok/s, accepted {runs[str(k)]['accepted_tokens']} of "
                  f"{runs[str(k)]['draft_tokens']}", flush=True)
        base = runs["0"]["outputs"]
        for r in runs.values():
            r["same_as_k0"] = r.pop("outputs") == base
        results["engines"][name] = runs
    md = report(results)
    write_results(RESULTS / "spec_decode.json", results, markdown=md)
    plot(results)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
