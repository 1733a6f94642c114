"""fp8 KV pages: what they cost in quality and what they buy in memory and throughput.

Three measurements, one run, float32 compute on this CPU:

  quality     held-out perplexity of the trained examples (LCKV w2 and its identity twin) and, when
              `benchmarks/train_deep.py` has built them in models/deep/, of the trained deep pair (12 layers), with
              pages in float32 (auto), fp8_e4m3 and fp8_e5m2, on the truly held-out Troilus excerpt
              (results/lm_eval_heldout.txt), windows of 256 tokens, m+b passes (`lckv-vllm quality
              --kv-cache-dtype`).  fp8 on both CPU paths: the default `cpu` path (vLLM's CPU kernels, which round
              toward zero) and the `torch` path (to nearest).
  capacity    KV tokens at one KV budget: w2, identity and vLLM's Llama on the identity example's weights (exported
              as plain Llama), auto vs fp8.
  throughput  a KV-bound load (more requests than the budget holds: short prompts, long generations, ignore_eos)
              on the bench shape (12 layers, hidden 256, random weights): LCKV w2 and vLLM's Llama, each with
              float32 and fp8 pages, the same budget; output tokens/s, median of paired per-round ratios against
              Llama with float32 pages, alternating order.

    .venv/bin/python -m benchmarks.fp8_pages [--rounds 2] [--requests 48] -> results/fp8_pages.{json,md,png}
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, machine, pyplot, save_figure, script_env, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
EXAMPLES = {"lckv-w2": ROOT / "examples" / "shakespeare-lckv-w2", "identity": ROOT / "examples" / "shakespeare-identity"}
DEEP = {"deep-lckv-w2": ROOT / "models" / "deep" / "lckv-w2", "deep-identity": ROOT / "models" / "deep" / "identity"}
HELD_OUT = RESULTS / "lm_eval_heldout.txt"
DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2")
BLOCK = 32  # vLLM's CPU kernels: a multiple of 32 for fp8 pages and for vLLM's Llama


def quality(max_tokens: int, window: int) -> list[dict]:
    from lckv_vllm.tools import deploy
    from lckv_vllm.tools.env import temporary_env

    text = HELD_OUT.read_text(encoding="utf-8")
    rows = []
    models = {**EXAMPLES, **{k: p for k, p in DEEP.items() if (p / "config.json").exists()}}
    for name, path in models.items():
        for path_name in ("cpu", "torch"):
            for dtype in DTYPES:
                if path_name == "torch" and dtype == "auto":
                    continue  # float32 pages are the same numbers on both paths
                with temporary_env({"LCKV_ATTENTION_IMPL": path_name}):
                    (row,) = deploy.perplexities(path, [None], text, max_tokens=max_tokens, window=window,
                                                 kv_cache_dtype=dtype, engine_kwargs=dict(block_size=BLOCK),
                                                 progress=lambda m: print(f"  {name} {path_name}: {m}", flush=True))
                rows.append({"model": name, "path": path_name, **row})
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["kv_cache_dtype"] == "auto")
        r["vs_auto"] = r["perplexity"] / base["perplexity"] - 1
    return rows


def _engine(path, budget: int, dtype: str, max_seqs: int, max_model_len: int = 1024):
    from vllm import LLM

    return LLM(str(path), dtype="float32", kv_cache_memory_bytes=budget, max_model_len=max_model_len, seed=0,
               block_size=BLOCK, max_num_seqs=max_seqs, kv_cache_dtype=dtype)


def _kv_tokens(llm) -> int:
    cc = llm.llm_engine.vllm_config.cache_config
    return cc.num_gpu_blocks * cc.block_size


def capacity(work: Path, budget: int) -> list[dict]:
    from lckv_vllm.tools.checkpoint import export_llama

    llama = export_llama(EXAMPLES["identity"], work / "identity-llama")
    rows = []
    for name, path in {**EXAMPLES, "vllm-llama (identity weights)": llama}.items():
        for dtype in ("auto", "fp8"):
            llm = _engine(path, budget, dtype, 16)
            rows.append({"model": name, "kv_cache_dtype": dtype, "kv_tokens": _kv_tokens(llm)})
            print(f"  capacity {name} {dtype}: {rows[-1]['kv_tokens']} tokens", flush=True)
    for r in rows:
        base = next(b for b in rows if b["model"] == r["model"] and b["kv_cache_dtype"] == "auto")
        r["vs_auto"] = r["kv_tokens"] / base["kv_tokens"]
    return rows


def throughput(work: Path, args) -> dict:
    import random

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from benchmarks.throughput import bench_models

    ident, llama, w2 = bench_models(work)
    engines = {"vllm-llama": (llama, "auto"), "vllm-llama-fp8": (llama, "fp8"), "lckv-w2": (w2, "auto"),
               "lckv-w2-fp8": (w2, "fp8")}
    rnd = random.Random(0)
    prompts = [TokensPrompt(prompt_token_ids=[rnd.randrange(3, 4000) for _ in range(args.prompt_len)])
               for _ in range(args.requests)]
    sp = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    from lckv_vllm.tools import deploy

    # budget: Llama with float32 pages holds `args.full_seqs` whole sequences
    cfg = deploy.load_config(llama)
    kv_heads, head_dim = deploy.kv_shape(cfg)
    seq_tokens = args.prompt_len + args.output_len
    llama_bytes_per_token = cfg["num_hidden_layers"] * 2 * kv_heads * head_dim * 4  # K and V, float32
    budget = args.full_seqs * seq_tokens * llama_bytes_per_token
    res, live = {}, {}
    for name, (path, dtype) in engines.items():
        llm = _engine(path, budget, dtype, args.requests, max_model_len=seq_tokens + BLOCK)
        llm.generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up
        live[name] = llm
        res[name] = {"kv_cache_dtype": dtype, "kv_tokens": _kv_tokens(llm),
                     "full_sequences_held": _kv_tokens(llm) / seq_tokens, "output_tok_s": []}
    for k in range(args.rounds):
        order = list(live.items())
        for name, llm in (order if k % 2 == 0 else order[::-1]):
            t = time.perf_counter()
            outs = llm.generate(prompts, sp, use_tqdm=False)
            dt = time.perf_counter() - t
            res[name]["output_tok_s"].append(sum(len(o.outputs[0].token_ids) for o in outs) / dt)
            print(f"  round {k} {name}: {res[name]['output_tok_s'][-1]:.0f} tok/s", flush=True)
    base = res["vllm-llama"]["output_tok_s"]
    for r in res.values():
        r["output_tok_s_median"] = statistics.median(r["output_tok_s"])
        r["ratio_vs_llama"] = statistics.median(a / b for a, b in zip(r["output_tok_s"], base))
    return {"budget_bytes": budget, "prompt_len": args.prompt_len, "output_len": args.output_len,
            "requests": args.requests, "rounds": args.rounds, "engines": res}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = ["# fp8 KV pages", "", f"Machine: {m['cpu']}, {m['cores']} cores, AVX-512 {m['avx512']}, torch "
             f"{m['torch']}, vLLM {m['vllm']}, float32 compute; {m['date']}.  Command: `{report['command']}`.", "",
             "## Held-out perplexity (lm_eval_heldout.txt, windows of 256 tokens, m+b passes)", "",
             "| model | path | pages | perplexity | vs float32 pages |", "| --- | --- | --- | --- | --- |"]
    for r in report["quality"]:
        lines.append(f"| {r['model']} | {r['path']} | {r['kv_cache_dtype']} | {r['perplexity']:.3f} | "
                     f"{100 * r['vs_auto']:+.2f} % |")
    lines += ["", "## KV capacity at one budget", "", "| model | pages | tokens | vs float32 pages |",
              "| --- | --- | --- | --- |"]
    for r in report["capacity"]:
        lines.append(f"| {r['model']} | {r['kv_cache_dtype']} | {r['kv_tokens']:,} | x{r['vs_auto']:.3f} |")
    t = report.get("throughput")
    if t:
        lines += ["", f"## KV-bound throughput ({t['requests']} requests of {t['prompt_len']} + {t['output_len']} "
                      f"tokens, KV budget {t['budget_bytes'] / 2**20:.1f} MiB, {t['rounds']} rounds)", "",
                  "| engine | pages | KV tokens | whole sequences held | output tok/s (median) | vs Llama float32 |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for name, r in t["engines"].items():
            lines.append(f"| {name} | {r['kv_cache_dtype']} | {r['kv_tokens']:,} | {r['full_sequences_held']:.1f} "
                         f"| {r['output_tok_s_median']:.0f} | x{r['ratio_vs_llama']:.2f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    q = [r for r in report["quality"] if r["kv_cache_dtype"] != "auto"]
    labels = [f"{r['model']}\n{r['path']} {r['kv_cache_dtype'].replace('fp8_', '')}" for r in q]
    axes[0].bar(range(len(q)), [100 * r["vs_auto"] for r in q],
                color=["#3a7" if r["path"] == "torch" else "#a73" for r in q])
    for y in (-1, 1):
        axes[0].axhline(y, color="#c33", lw=0.8, ls="--")
    axes[0].axhline(0, color="#333", lw=0.6)
    axes[0].set_xticks(range(len(q)), labels, rotation=60, fontsize=7)
    axes[0].set_ylabel("held-out perplexity vs float32 pages (%)")
    axes[0].set_title("quality cost of fp8 pages (dashed: +-1 %)")
    t = report.get("throughput")
    if t:
        names = list(t["engines"])
        axes[1].bar(names, [t["engines"][n]["ratio_vs_llama"] for n in names], color="#37a")
        axes[1].set_ylabel("output tok/s vs vLLM Llama, float32 pages")
        axes[1].set_title("KV-bound throughput, same KV budget")
        axes[1].tick_params(axis="x", labelrotation=20)
    save_figure(fig, path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--max-tokens", type=int, default=2560, help="held-out tokens scored per model")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=224)
    ap.add_argument("--full-seqs", type=int, default=4, help="whole sequences the baseline's budget holds")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--quality-only", action="store_true",
                    help="measure quality again (e.g. once the deep pair is trained) and keep the JSON's other parts")
    ap.add_argument("--out", default=str(RESULTS / "fp8_pages.json"))
    ap.add_argument("--work", default=str(ROOT / "models" / "fp8_pages"))
    ap.add_argument("--report-only", action="store_true", help="markdown and plot again from the JSON")
    args = ap.parse_args(argv)
    if args.report_only:
        import json

        report = json.loads(Path(args.out).read_text())
        Path(args.out).with_suffix(".md").write_text(markdown(report))
        plot(report, Path(args.out).with_suffix(".png"))
        return 0
    script_env(force_in_process=True)
    work = Path(args.work)
    report = {"machine": machine(), "command": command_line("benchmarks.fp8_pages", argv)}
    if args.quality_only:
        import json

        old = json.loads(Path(args.out).read_text())
        report = {**old, "quality_machine": report["machine"], "quality_command": report["command"]}
    print("quality", flush=True)
    report["quality"] = quality(args.max_tokens, args.window)
    if not args.quality_only:
        print("capacity", flush=True)
        report["capacity"] = capacity(work, 32 << 20)
    if not args.no_throughput and not args.quality_only:
        print("throughput", flush=True)
        report["throughput"] = throughput(work, args)
    out = write_results(args.out, report, markdown=markdown(report))
    plot(report, out.with_suffix(".png"))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
