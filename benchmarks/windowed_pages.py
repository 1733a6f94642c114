"""Windowed pages: what freeing sliding-window producers' old pages buys at a fixed KV budget, in one run.

Plans (bench shape: 12 layers, hidden 256, 8 KV heads of 32, fp32, random weights: capacity and speed do not depend
on training), sliding window W = 128:
  yoco  `0s_1s_2s_3s_4s_5s_5_5_5_5_5_5`: layers 0-5 slide over their own KV, 6-11 read layer 5 (full pages: it has
        full-attention readers); 5 windowed producers + 1 full
  swa   all 12 layers slide over their own KV (Mistral-style): 12 windowed producers
Each plan runs twice on the same weights and KV budget: full pages for every producer (`LCKV_WINDOWED_PAGES=0`, the
layout before windowed pages) and windowed pages (the default).  Load: `--requests` sequences of `--prompt` +
`--gen` tokens (ignore_eos, greedy), all submitted at once, `max_num_seqs` = requests.  Reported per run: vLLM's
maximum concurrency for a `--gen + --prompt`-token sequence (from the engine's KV-cache config), the most sequences
running at once and the most context tokens they held together (sampled after every engine step: what fits in
the budget), preemptions, wall time, output tokens/s; per plan the ratios windowed / full and whether every
request's greedy tokens are equal.  vLLM's own concurrency figure is its admission bound, which reserves room for a
whole prefill in flight per sequence, so it barely moves; the context actually held is the capacity that changes.  Writes benchmarks/results/windowed_pages.json
and .png.

    .venv/bin/python -m benchmarks.windowed_pages [--requests 16] [--prompt 64] [--gen 448] [--kv-mib 24]
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, pyplot, save_figure, script_env, write_results

script_env()

HERE = Path(__file__).resolve().parent
WINDOW = 128
BLOCK = 16
PLANS = {
    "yoco": "_".join([f"{i}s" for i in range(6)] + ["5"] * 6),
    "swa": "_".join(f"{i}s" for i in range(12)),
}


def run(path: Path, windowed: bool, args) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    from lckv_vllm.tools.env import temporary_env

    with temporary_env({"LCKV_WINDOWED_PAGES": "1" if windowed else "0"}):
        llm = LLM(str(path), dtype="float32", kv_cache_memory_bytes=args.kv_mib << 20,
                  max_model_len=args.prompt + args.gen, seed=0, block_size=BLOCK, max_num_seqs=args.requests,
                  disable_log_stats=False)
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    cfg = sched.kv_cache_config
    groups = [type(g.kv_cache_spec).__name__ for g in cfg.kv_cache_groups]
    concurrency = get_max_concurrency_for_kv_cache_config(llm.llm_engine.vllm_config, cfg)
    rnd = random.Random(1)
    prompts = [[rnd.randrange(3, 32000) for _ in range(args.prompt)] for _ in range(args.requests)]
    sp = SamplingParams(max_tokens=args.gen, temperature=0, ignore_eos=True)
    # warm-up (one short request), then the load
    eng.add_request("warm", TokensPrompt(prompt_token_ids=prompts[0][:8]), SamplingParams(max_tokens=4))
    while eng.has_unfinished_requests():
        eng.step()
    t0 = time.perf_counter()
    for i, p in enumerate(prompts):
        eng.add_request(f"r-{i}", TokensPrompt(prompt_token_ids=p), sp)
    tokens: dict[int, list[int]] = {}
    most, preempted, held = 0, set(), 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                tokens[int(out.request_id.split("-")[1])] = list(out.outputs[0].token_ids)
        most = max(most, len(sched.running))
        held = max(held, sum(r.num_computed_tokens for r in sched.running))
        preempted |= {r.request_id for r in sched.requests.values() if r.num_preemptions}
    wall = time.perf_counter() - t0
    del llm, eng, sched
    gc.collect()
    return {"windowed_pages": windowed, "kv_cache_groups": groups, "num_blocks": cfg.num_blocks,
            "max_concurrency_vllm": round(concurrency, 2), "most_running": most, "peak_context_tokens": held,
            "preempted_requests": len(preempted), "wall_s": round(wall, 2),
            "output_tokens_per_s": round(args.requests * args.gen / wall, 1),
            "tokens": [tokens[i] for i in range(args.requests)]}


def plot(result: dict, out: Path) -> None:
    plt = pyplot()

    names = list(result["plans"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "peak_context_tokens", "context tokens held at once (peak)"),
                           (axes[1], "output_tokens_per_s", "output tokens/s")):
        for k, windowed in enumerate((False, True)):
            vals = [result["plans"][n]["runs"][k][key] for n in names]
            ax.bar([i + (k - 0.5) * 0.38 for i in range(len(names))], vals, width=0.38,
                   label="windowed pages" if windowed else "full pages")
        ax.set_xticks(range(len(names)), names)
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    a = result["args"]
    fig.suptitle(f"{a['requests']} x ({a['prompt']} + {a['gen']}) tokens, KV budget {a['kv_mib']} MiB, window "
                 f"{WINDOW} (12 layers, hidden 256, fp32, CPU)", fontsize=9)
    save_figure(fig, out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--gen", type=int, default=448)
    ap.add_argument("--kv-mib", type=int, default=24)
    args = ap.parse_args()

    from lckv_vllm.tools.checkpoint import make_preset
    from lckv_vllm.tools.harness import machine

    work = HERE.parent / "models" / "windowed"
    result = {"command": command_line("benchmarks.windowed_pages"), "machine": machine(),
              "args": vars(args), "window": WINDOW, "block_size": BLOCK, "plans": {}}
    for name, layer_types in PLANS.items():
        path = make_preset("bench-identity", work / name, layer_types=layer_types, sliding_window=WINDOW)
        runs = [run(path, False, args), run(path, True, args)]
        full, win = runs
        summary = {"layer_types": layer_types,
                   "context_tokens_ratio": round(win["peak_context_tokens"] / full["peak_context_tokens"], 2),
                   "preemptions": [full["preempted_requests"], win["preempted_requests"]],
                   "admission_ratio_vllm": round(win["max_concurrency_vllm"] / full["max_concurrency_vllm"], 2),
                   "throughput_ratio": round(win["output_tokens_per_s"] / full["output_tokens_per_s"], 2),
                   "outputs_identical": full["tokens"] == win["tokens"]}
        for r in runs:
            r.pop("tokens")
        result["plans"][name] = {**summary, "runs": runs}
        print(f"{name:5s} full: {full['peak_context_tokens']} tokens held, {full['output_tokens_per_s']} tok/s, "
              f"{full['preempted_requests']} preempted | windowed: {win['peak_context_tokens']} tokens held, "
              f"{win['output_tokens_per_s']} tok/s, {win['preempted_requests']} preempted | context x"
              f"{summary['context_tokens_ratio']}, throughput x{summary['throughput_ratio']}, identical outputs: "
              f"{summary['outputs_identical']}", flush=True)
    out = HERE / "results"
    write_results(out / "windowed_pages.json", result, indent=2)
    plot(result, out / "windowed_pages.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
