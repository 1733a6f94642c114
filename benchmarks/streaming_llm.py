"""StreamingLLM mode on the trained Shakespeare models: quality, KV blocks and time per token over a long stream.

Models: the committed `examples/shakespeare-identity` and `examples/shakespeare-lckv-w2` (6 layers, trained on
256-token windows, max_position_embeddings 4096).  Streaming: `lckv_streaming` = 4 sinks + a window of 252 (sinks +
window = the training length), `VLLM_ALLOW_LONG_MAX_MODEL_LEN=1` with a max_model_len past the trained context.
All through vLLM in this process (fp32, eager, CPU, the plugin's defaults otherwise):

1. **Perplexity of one `--stream`-token stream of held-out Shakespeare** (prompt logprobs of a single request, so
   every token is scored with everything before it as context), per 1k-token bucket, against the model's
   *windowed* perplexity: the same tokens scored in independent 256-token windows (its training length), per
   bucket.  Full attention (no streaming) is the contrast: the request is refused at the context limit (the error
   is recorded), and its perplexity on the first 4096 tokens shows what positions beyond training do.
2. **KV blocks held and time per output token vs tokens streamed**: one request generating `--gen` tokens
   (ignore_eos) after a 64-token prompt, blocks read from vLLM's KV cache manager after every step, step times per
   1k-token bucket; identity and LCKV, each with streaming and with full attention (which stops at 4096), full
   attention both on the torch path (the one streaming reads through: the like-for-like contrast) and on the default
   path (vLLM's C++ CPU kernels).

    .venv/bin/python -m benchmarks.streaming_llm [--stream 16384] [--gen 8192]  -> benchmarks/results/streaming_llm.{json,png}
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path

from lckv_vllm.tools.harness import command_line, model_of, pyplot, save_figure, script_env, write_results

script_env(force_in_process=True)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODELS = {"identity": ROOT / "examples" / "shakespeare-identity", "lckv-w2": ROOT / "examples" / "shakespeare-lckv-w2"}
SINKS, WINDOW, TRAIN_LEN = 4, 252, 256
BLOCK = 16
BUCKET = 1024
CONTEXT_LIMIT = 4096  # the models' max_position_embeddings


def make_engine(path: Path, streaming: bool, max_model_len: int, impl: str | None = None):
    from vllm import LLM

    from lckv_vllm.tools.env import temporary_env

    kw = dict(dtype="float32", kv_cache_memory_bytes=256 << 20, max_model_len=max_model_len, seed=0,
              block_size=BLOCK, max_num_seqs=64, enforce_eager=True)
    env = {"LCKV_ATTENTION_IMPL": impl} if impl else {}
    if streaming:
        kw["hf_overrides"] = {"lckv_streaming": {"sink_tokens": SINKS, "window": WINDOW}}
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    with temporary_env(env):
        return LLM(str(path), **kw)


def prompt_nlls(llm, prompts: list[list[int]]) -> list[list[float]]:
    """-log p(token i | tokens < i) for i >= 1 of each prompt."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    return [[-d[tok].logprob for tok, d in zip(p[1:], o.prompt_logprobs[1:])] for p, o in zip(prompts, outs)]


def bucket_ppl(nll_at: dict[int, float], n: int) -> list[float]:
    """Perplexity per BUCKET-token bucket of positions (position -> nll of the token there)."""
    out = []
    for b in range(0, n, BUCKET):
        xs = [nll_at[i] for i in range(b, min(b + BUCKET, n)) if i in nll_at]
        out.append(round(math.exp(sum(xs) / len(xs)), 3) if xs else None)
    return out


def quality(name: str, path: Path, ids: list[int], args) -> dict:
    n = len(ids)
    # windowed: independent 256-token windows over the same tokens (positions 1..255 of each scored)
    llm = make_engine(path, False, CONTEXT_LIMIT)
    windows = [ids[i:i + TRAIN_LEN] for i in range(0, n - 1, TRAIN_LEN)]
    windowed = {}
    for w0, nll in zip(range(0, n - 1, TRAIN_LEN), prompt_nlls(llm, windows)):
        windowed.update({w0 + 1 + k: x for k, x in enumerate(nll)})
    # full attention on the stream: refused past the context limit; its first CONTEXT_LIMIT tokens scored
    refused = None
    try:
        prompt_nlls(llm, [ids])
    except Exception as e:  # what a user of the plain mode gets
        refused = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
    head = ids[:CONTEXT_LIMIT - 1]
    full = {1 + k: x for k, x in enumerate(prompt_nlls(llm, [head])[0])}
    del llm
    gc.collect()
    llm = make_engine(path, True, n + 1)
    t0 = time.perf_counter()
    streamed = {1 + k: x for k, x in enumerate(prompt_nlls(llm, [ids])[0])}
    wall = time.perf_counter() - t0
    del llm
    gc.collect()
    s_b, w_b = bucket_ppl(streamed, n), bucket_ppl(windowed, n)
    ratios = [round(s / w, 4) for s, w in zip(s_b, w_b)]
    print(f"{name}: streamed ppl per 1k {s_b}\n  windowed {w_b}\n  ratio max {max(ratios)}; full attention "
          f"first 4k {bucket_ppl(full, len(head) + 1)}; refused: {refused}", flush=True)
    return {"stream_tokens": n, "streamed_ppl_per_1k": s_b, "windowed_ppl_per_1k": w_b, "ratio_per_1k": ratios,
            "max_ratio": max(ratios), "streamed_ppl": round(math.exp(sum(streamed.values()) / len(streamed)), 3),
            "windowed_ppl": round(math.exp(sum(windowed.values()) / len(windowed)), 3),
            "full_attention_ppl_per_1k_first_4k": bucket_ppl(full, len(head) + 1),
            "full_attention_refused": refused, "stream_scoring_wall_s": round(wall, 1)}


def generation(path: Path, streaming: bool, args, impl: str | None = None) -> dict:
    """One request: 64 prompt tokens, then up to --gen tokens; blocks held and step time per bucket.  `impl`: the
    attention path (streaming always reads through the torch path; full attention runs both it and the default,
    vLLM's C++ CPU kernels)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    limit = args.gen + 65 if streaming else CONTEXT_LIMIT
    llm = make_engine(path, streaming, limit, impl)
    path_name = model_of(llm).model.path.name
    eng = llm.llm_engine
    sched = eng.engine_core.engine_core.scheduler
    managers = sched.kv_cache_manager.coordinator.single_type_managers
    n_gen = min(args.gen, limit - 64)
    eng.add_request("g", TokensPrompt(prompt_token_ids=list(range(5, 69))),
                    SamplingParams(max_tokens=n_gen, temperature=0, ignore_eos=True))
    eng.step()  # the prefill
    times: list[float] = []
    blocks: list[int] = []
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        eng.step()
        times.append(time.perf_counter() - t0)
        held = [sum(not b.is_null for b in bl) for m in managers for bl in m.req_to_blocks.values()]
        blocks.append(max(held) if held else 0)
    del llm, eng, sched, managers
    gc.collect()
    per_bucket = []
    for b in range(0, len(times), BUCKET):
        ts = sorted(times[b:b + BUCKET])
        per_bucket.append({"tokens_streamed": 64 + b + len(ts), "median_ms": round(1e3 * ts[len(ts) // 2], 3),
                           "blocks_held": max(blocks[b:b + BUCKET])})
    return {"streaming": streaming, "attention_path": path_name, "generated": len(times) + 1, "max_model_len": limit,
            "max_blocks_held": max(blocks), "per_1k": per_bucket}


def plot(result: dict, out: Path) -> None:
    plt = pyplot()

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name, r in result["models"].items():
        q = r["quality"]
        x = [BUCKET * (i + 1) for i in range(len(q["streamed_ppl_per_1k"]))]
        axes[0].plot(x, q["streamed_ppl_per_1k"], marker="o", label=f"{name} streaming")
        axes[0].plot(x, q["windowed_ppl_per_1k"], ls="--", label=f"{name} windowed ({TRAIN_LEN})")
        xf = [BUCKET * (i + 1) for i in range(len(q["full_attention_ppl_per_1k_first_4k"]))]
        axes[0].plot(xf, q["full_attention_ppl_per_1k_first_4k"], ls=":", marker="x", label=f"{name} full attention")
        for g in r["generation"]:
            lab = f"{name} {'streaming' if g['streaming'] else 'full attention'} ({g['attention_path']} path)"
            xs = [p["tokens_streamed"] for p in g["per_1k"]]
            axes[1].plot(xs, [p["blocks_held"] for p in g["per_1k"]], marker="o", label=lab)
            axes[2].plot(xs, [p["median_ms"] for p in g["per_1k"]], marker="o", label=lab)
    axes[0].set_yscale("log")
    axes[0].set_title("held-out perplexity per 1k tokens of the stream", fontsize=10)
    axes[1].set_title("KV blocks held by the sequence (per producer group)", fontsize=10)
    axes[2].set_title("time per output token (median ms)", fontsize=10)
    for ax in axes:
        ax.set_xlabel("tokens streamed")
        ax.legend(fontsize=6)
    fig.suptitle(f"StreamingLLM mode: {SINKS} sinks + window {WINDOW}, trained 6-layer Shakespeare models, fp32, "
                 f"2-core CPU; full attention stops at the {CONTEXT_LIMIT}-token context limit", fontsize=9)
    save_figure(fig, out, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stream", type=int, default=16384)
    ap.add_argument("--gen", type=int, default=8192)
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from lckv_vllm import register
    from lckv_vllm.tools.harness import machine
    from benchmarks.train_shakespeare import corpus

    register()
    _, held = corpus()
    result = {"command": command_line("benchmarks.streaming_llm"), "machine": machine(),
              "args": vars(args), "sink_tokens": SINKS, "window": WINDOW, "block_size": BLOCK,
              "bound_blocks_per_group": math.ceil(SINKS / BLOCK) + math.ceil(WINDOW / BLOCK) + 1, "models": {}}
    for name, path in MODELS.items():
        ids = AutoTokenizer.from_pretrained(str(path)).encode(held.read_text(encoding="utf-8"))[: args.stream]
        result["models"][name] = {"quality": quality(name, path, ids, args),
                                  "generation": [generation(path, True, args), generation(path, False, args, "torch"),
                                                 generation(path, False, args)]}
        for g in result["models"][name]["generation"]:
            print(f"  {'streaming' if g['streaming'] else 'full'} ({g['attention_path']}): {g['generated']} tokens, max blocks "
                  f"{g['max_blocks_held']}, ms/token per 1k {[p['median_ms'] for p in g['per_1k']]}", flush=True)
    write_results(RESULTS / "streaming_llm.json", result, indent=2)
    plot(result, RESULTS / "streaming_llm.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
