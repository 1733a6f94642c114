"""What the pass economy saves: the cost of a mixed step, and continuous-batching throughput, economy on vs off.

A cyclic plan iterates its cyclic segment m+b times over a step that contains a new prompt.  Without the economy,
every row of such a step (the decodes batched with the prompt included) goes through every pass; with it
(`LCKV_PASS_ECONOMY=1`, the default), pass k runs only over each query's tokens from index k-1 on.

Two measurements, all engines alive in one process, rounds alternating between engines:
1. mixed step: `--running` sequences decode; one prompt of `--prompt-len` tokens arrives; the wall time of the
   engine step that holds prompt + decodes, against a decode-only step of the same batch (median over `--steps`).
2. continuous batching, memory not limiting: `--requests` requests of 16-token prompts with output lengths spread
   +-50 % around `--output-len`, at most 16 running: output tokens/s of w2 (economy on / off) against the identity
   plan and vLLM's own Llama on the identity weights (median of per-round ratios).

    .venv/bin/python -m benchmarks.mixed_step [--rounds 3] [--out benchmarks/results]
Writes mixed_step.json and mixed_step.png.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, machine, pyplot, save_figure, script_env, write_results

script_env()

HERE = Path(__file__).resolve().parent

BLOCK_SIZE = 128
KV_BUDGET = 512 << 20  # memory never limits these loads


def engine(path, env, max_num_seqs):
    from vllm import LLM

    from lckv_vllm.tools.env import temporary_env

    with temporary_env(env):
        return LLM(str(path), dtype="float32", kv_cache_memory_bytes=KV_BUDGET, max_model_len=2048, seed=0,
                   block_size=BLOCK_SIZE, max_num_seqs=max_num_seqs)


def mixed_step_times(llm, rnd, running: int, prompt_len: int, steps: int) -> dict:
    """Median wall time of decode-only steps and of steps that admit one new prompt among `running` decodes."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    eng = llm.llm_engine
    long_sp = SamplingParams(max_tokens=1500, temperature=0, ignore_eos=True)
    for i in range(running):
        eng.add_request(f"run-{i}", TokensPrompt(prompt_token_ids=[rnd.randrange(3, 32000) for _ in range(16)]),
                        long_sp)
    for _ in range(3):
        eng.step()  # prefill, then every sequence decodes
    decode, mixed = [], []
    for k in range(steps):
        t = time.perf_counter()
        eng.step()
        decode.append(time.perf_counter() - t)
        # the newcomer asks for one token: it leaves right after its prefill, so the batch stays `running` decodes
        eng.add_request(f"new-{k}", TokensPrompt(prompt_token_ids=[rnd.randrange(3, 32000) for _ in range(prompt_len)]),
                        SamplingParams(max_tokens=1, temperature=0, ignore_eos=True))
        t = time.perf_counter()
        eng.step()
        mixed.append(time.perf_counter() - t)
    for rid in [f"run-{i}" for i in range(running)]:
        eng.abort_request([rid])
    while eng.has_unfinished_requests():
        eng.step()
    return {"decode_step_s": statistics.median(decode), "mixed_step_s": statistics.median(mixed)}


def continuous_throughput(llm, requests) -> float:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
    sps = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for _, n in requests]
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--running", type=int, default=15)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--workdir", default=str(HERE.parent / "models" / "bench"))
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args()

    from benchmarks.throughput import bench_models

    ident, llama, w2 = bench_models(Path(args.workdir))
    on, off = {"LCKV_PASS_ECONOMY": "1"}, {"LCKV_PASS_ECONOMY": "0"}

    # 1. mixed step cost
    step_engines = {"w2 economy": engine(w2, on, 32), "w2 no economy": engine(w2, off, 32),
                    "identity": engine(ident, {}, 32)}
    for llm in step_engines.values():  # warm-up: the first steps of each shape pay for compilation
        for n in args.prompt_len:
            mixed_step_times(llm, random.Random(n), args.running, n, 2)
    steps: dict = {name: {n: [] for n in args.prompt_len} for name in step_engines}
    for r in range(args.rounds):
        order = list(step_engines.items())
        for name, llm in (order if r % 2 == 0 else order[::-1]):
            for n in args.prompt_len:
                steps[name][n].append(mixed_step_times(llm, random.Random(100 * r + n), args.running, n,
                                                       args.steps))
        print(f"mixed-step round {r + 1}/{args.rounds} done", flush=True)
    mixed = {name: {str(n): {"decode_step_ms": 1e3 * statistics.median(x["decode_step_s"] for x in runs),
                             "mixed_step_ms": 1e3 * statistics.median(x["mixed_step_s"] for x in runs)}
                    for n, runs in per.items()} for name, per in steps.items()}

    # 2. continuous batching, memory not limiting, at most 16 running
    rnd = random.Random(0)
    lo, hi = args.output_len // 2, args.output_len * 3 // 2
    requests = [([rnd.randrange(3, 32000) for _ in range(16)], rnd.randint(lo, hi)) for _ in range(args.requests)]
    cb_engines = {"llama": engine(llama, {}, 16), "identity": engine(ident, {}, 16),
                  "w2 economy": engine(w2, on, 16), "w2 no economy": engine(w2, off, 16)}
    for llm in cb_engines.values():
        continuous_throughput(llm, requests)  # warm-up: every batch shape the load produces is compiled once
    tps: dict = {name: [] for name in cb_engines}
    for r in range(args.rounds):
        order = list(cb_engines.items())
        for name, llm in (order if r % 2 == 0 else order[::-1]):
            tps[name].append(continuous_throughput(llm, requests))
        print(f"continuous-batching round {r + 1}/{args.rounds} done", flush=True)

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(tps[a], tps[b]))

    continuous = {name: {"output_tok_s": v, "output_tok_s_median": statistics.median(v),
                         "ratio_vs_identity": ratio(name, "identity"), "ratio_vs_llama": ratio(name, "llama")}
                  for name, v in tps.items()}
    report = {
        "benchmark": "pass economy: mixed-step cost and continuous-batching throughput",
        "command": command_line("benchmarks.mixed_step"),
        "machine": machine(),
        "settings": {"dtype": "float32", "block_size": BLOCK_SIZE, "kv_budget_bytes": KV_BUDGET, "rounds": args.rounds,
                     "model": "bench presets: 12 layers, hidden 256, 8 heads (8 KV), vocab 32000; w2 = 3 of 12 "
                              "layers keep KV, cyclic segment of 10 layers, m+b = 9",
                     "mixed_step": {"running_decodes": args.running, "prompt_lens": args.prompt_len,
                                    "steps_per_round": args.steps},
                     "continuous": {"requests": args.requests, "prompt_len": 16, "output_len": [lo, hi],
                                    "max_num_seqs": 16}, "seed": 0},
        "mixed_step": mixed,
        "continuous": continuous,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_results(out / "mixed_step.json", report, indent=2)
    for name, per in mixed.items():
        print(name, {n: (round(v["decode_step_ms"], 1), round(v["mixed_step_ms"], 1)) for n, v in per.items()})
    for name, c in continuous.items():
        print(f"{name:14s} {c['output_tok_s_median']:7.1f} tok/s  x{c['ratio_vs_identity']:.3f} vs identity  "
              f"x{c['ratio_vs_llama']:.3f} vs llama")

    plt = pyplot()

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = list(mixed)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs = [j + i * width for j in range(len(args.prompt_len))]
        a1.bar(xs, [mixed[name][str(n)]["mixed_step_ms"] for n in args.prompt_len], width, label=name)
    a1.set_xticks([j + width for j in range(len(args.prompt_len))], [f"prompt {n}" for n in args.prompt_len])
    a1.set_ylabel(f"step time (ms): 1 new prompt + {args.running} decodes")
    a1.legend()
    a1.set_title("mixed step cost")
    cn = list(continuous)
    a2.bar(cn, [continuous[n]["output_tok_s_median"] for n in cn], color=["grey", "tab:blue", "tab:green", "lightgreen"])
    for i, n in enumerate(cn):
        a2.text(i, continuous[n]["output_tok_s_median"], f"x{continuous[n]['ratio_vs_identity']:.2f} vs id",
                ha="center", va="bottom", fontsize=8)
    a2.set_ylabel("output tokens/s (median)")
    a2.set_title(f"continuous batching, <=16 running, outputs {lo}-{hi}")
    save_figure(fig, out / "mixed_step.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
