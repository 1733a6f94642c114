"""How fast trained LCKV models' iterative prefill converges, and what adaptive passes cost in quality.

For each trained LCKV model, on held-out Shakespeare cut into windows of the model's training length, by the float64
reference (`ReferenceModel`, no vLLM):
  * perplexity of token-by-token encoding (exact), of 1, 2, 3, 4, 5 and m+b fixed passes, of adaptive passes at a
    sweep of tolerances (with the passes they used per window) and of chunk-by-chunk encoding (chunks of 128, 64, 16
    tokens) under the default tolerance;
  * per prefill block size (whole windows as one prompt, the default tolerance): perplexity, and the rows the cyclic
    segment recomputed per token (the cost of the passes: 1 = one pass over every token);
  * the largest |logprob difference| of any scored token against the m+b-pass encoding, per tolerance: the measured
    constant behind the bound the tests use (|dlogprob| <= C x tol);
and through vLLM (prompt logprobs, fp32, the plugin's `cpu` path): perplexity under the defaults (chunked prefill,
prefix caching, adaptive passes), under the defaults with prompts split into 64-token chunks by the scheduler, and
exact (`LCKV_CHUNKED_PREFILL=0 LCKV_PREFILL_TOL=0`: whole prompt, always m+b passes), with the passes the engine
reports.  The default tolerance (`settings.DEFAULT_PREFILL_TOL`) is chosen from this table: the loosest that keeps
every trained model within 0.1 % of its m+b-pass perplexity under every split measured (the chunked encodings are
also scored at the next looser tolerance, to show where that stops holding).

    .venv/bin/python -m benchmarks.convergence [--windows 6]   -> benchmarks/results/convergence.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

from lckv_vllm.tools.harness import pyplot, save_figure, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
MODELS = {  # name -> checkpoint directory (trained LCKV models)
    "shakespeare-lckv-w2 (6 layers)": ROOT / "examples" / "shakespeare-lckv-w2",
    "deep-lckv-w2 (12 layers)": ROOT / "models" / "deep" / "lckv-w2",
}
FIXED = (1, 2, 3, 4, 5)
TOLS = (0.3, 0.2, 0.15, 0.1, 0.05, 0.03, 0.02, 0.01, 0.003, 0.001)
CHUNKS = (128, 64, 16)
BLOCKS = (0, 32, 64, 128, 256)  # prefill blocks (LCKV_PREFILL_BLOCK); 0 = the window as one block


def nll_of(logits, window) -> list[float]:
    import torch

    logp = torch.log_softmax(logits.double(), -1)
    return (-logp[torch.arange(len(window) - 1), torch.tensor(window[1:])]).tolist()


def ppl(nlls: list[list[float]]) -> float:
    flat = [x for w in nlls for x in w]
    return math.exp(sum(flat) / len(flat))


def reference_side(model: Path, windows: list[list[int]], previous: dict | None = None) -> dict:
    """`previous`: an earlier run's result for this model: its tolerance sweep is kept (it does not depend on the
    default tolerance), the default-tolerance measurements are redone."""
    from lckv_vllm.reference_model import ReferenceModel
    from lckv_vllm.settings import DEFAULT_PREFILL_TOL

    ref = ReferenceModel(model)
    mb = ref.plan.num_passes
    out: dict = {"m_plus_b": mb}
    t0 = time.time()
    if previous is not None:
        out.update({k: previous[k] for k in ("ppl_m_plus_b", "ppl_sequential", "fixed", "adaptive")})
        out["sweep_from_earlier_run"] = True
        return _chunked(ref, windows, out, DEFAULT_PREFILL_TOL, t0)
    exact = [nll_of(ref.forward_iterative(w, passes=mb, tol=0), w) for w in windows]
    out["ppl_m_plus_b"] = ppl(exact)
    out["ppl_sequential"] = ppl([nll_of(ref.forward_sequential(w), w) for w in windows])
    out["fixed"] = {str(k): ppl([nll_of(ref.forward_iterative(w, passes=k, tol=0), w) for w in windows])
                    for k in FIXED}
    out["adaptive"] = {}
    for tol in TOLS:
        nlls, passes, last = [], [], []
        for w in windows:
            stats: list = []
            logits = ref.forward_chunk(w, ref.new_cache(), tol=tol, stats=stats)
            nlls.append(nll_of(logits, w))
            passes.append(max(s[0] for s in stats))
            last.append(max(s[1] for s in stats))
        worst = max(abs(a - b) for wa, wb in zip(nlls, exact) for a, b in zip(wa, wb))
        out["adaptive"][str(tol)] = {
            "ppl": ppl(nlls), "rel_to_m_plus_b": ppl(nlls) / out["ppl_m_plus_b"] - 1, "passes": passes,
            "mean_passes": sum(passes) / len(passes), "last_change_max": max(last),
            "max_abs_dlogprob": worst, "dlogprob_over_tol": worst / tol,
        }
        print(f"  tol {tol}: ppl {ppl(nlls):.4f} ({out['adaptive'][str(tol)]['rel_to_m_plus_b']:+.2e}), passes "
              f"{passes}, max |dlogprob| {worst:.2e}", flush=True)
    return _chunked(ref, windows, out, DEFAULT_PREFILL_TOL, t0)


def _chunked(ref, windows, out: dict, tol: float, t0: float) -> dict:
    # chunked encodings under the default tolerance, and under the next looser one swept (what rules it out)
    looser = min((t for t in TOLS if t > tol), default=None)
    for key, t in (("chunked_default_tol", tol), ("chunked_looser_tol", looser)):
        if t is None:
            continue
        out[key] = {}
        for c in CHUNKS:
            nlls = []
            for w in windows:
                sizes = [c] * (len(w) // c) + ([len(w) % c] if len(w) % c else [])
                nlls.append(nll_of(ref.forward_chunked(w, sizes, tol=t), w))
            out[key][str(c)] = ppl(nlls)
    out["looser_tol"] = looser
    out["blocks_default_tol"] = {}
    segment = {i for seg in ref.plan.segments if seg.cyclic for i in seg.layers}
    rows = [0]
    layer = ref._layer

    def counting(i, h, *a):
        rows[0] += h.shape[0] if i in segment else 0
        return layer(i, h, *a)

    ref._layer = counting
    try:
        for b in BLOCKS:
            rows[0] = 0
            nlls = [nll_of(ref.forward_chunked(w, [len(w)], tol=tol, block=b), w) for w in windows]
            out["blocks_default_tol"][str(b)] = {
                "ppl": ppl(nlls), "rel_to_m_plus_b": ppl(nlls) / out["ppl_m_plus_b"] - 1,
                "rows_per_token": rows[0] / (len(segment) * sum(len(w) for w in windows))}
            print(f"  block {b}: {out['blocks_default_tol'][str(b)]}", flush=True)
    finally:
        del ref._layer
    out["reference_seconds"] = round(time.time() - t0, 1)
    return out


VLLM_CODE = r"""
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
from lckv_vllm.tools.deploy import prompt_nll
from lckv_vllm.tools.harness import model_of
model, windows, extra = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
llm = LLM(model, dtype="float32", max_model_len=2048, kv_cache_memory_bytes=256 << 20, seed=0, block_size=16,
          enforce_eager=True, **extra)
nll, n = prompt_nll(llm, windows)
m = model_of(llm).model
cfg = llm.llm_engine.vllm_config
print("@@" + json.dumps({"nll": nll, "tokens": n, "stats": m.prefill.stats.snapshot(),
                         "chunked_prefill": cfg.scheduler_config.enable_chunked_prefill,
                         "prefix_caching": cfg.cache_config.enable_prefix_caching}))
"""


def vllm_side(model: Path, windows: list[list[int]]) -> dict:
    runs = {
        "defaults": ({}, {}),
        "defaults, 64-token chunks": ({}, {"max_num_batched_tokens": 64, "max_num_seqs": 4}),
        "exact (whole prompt, m+b passes)": ({"LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}, {}),
    }
    out = {}
    for name, (env, extra) in runs.items():
        res = subprocess.run([sys.executable, "-c", VLLM_CODE, str(model), json.dumps(windows), json.dumps(extra)],
                             capture_output=True, text=True, env={**os.environ, **env, "VLLM_LOGGING_LEVEL": "ERROR"})
        line = next((x for x in res.stdout.splitlines() if x.startswith("@@")), None)
        if line is None:
            raise RuntimeError(f"vLLM run {name!r} failed:\n{res.stderr[-3000:]}")
        r = json.loads(line[2:])
        st = r["stats"]
        out[name] = {"ppl": math.exp(r["nll"] / r["tokens"]), "passes_histogram": st["passes"],
                     "prefills": st["prefills"], "unconverged": st["unconverged"], "env": env, "engine_args": extra,
                     "chunked_prefill": r["chunked_prefill"], "prefix_caching": r["prefix_caching"]}
        print(f"  vLLM {name}: ppl {out[name]['ppl']:.4f}, passes {st['passes']}", flush=True)
    base = out["exact (whole prompt, m+b passes)"]["ppl"]
    for r in out.values():
        r["rel_to_exact"] = r["ppl"] / base - 1
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--plot-only", action="store_true")
    ap.add_argument("--keep-sweep", action="store_true",
                    help="reuse the committed tolerance sweep; redo what depends on the default tolerance")
    args = ap.parse_args()
    if args.plot_only:
        write_outputs(json.loads((RESULTS / "convergence.json").read_text()))
        return 0
    from lckv_vllm.tools.deploy import text_windows
    from lckv_vllm.settings import DEFAULT_PREFILL_TOL
    from lckv_vllm.tools.harness import machine
    from benchmarks.train_shakespeare import corpus

    _, held_txt = corpus()
    held = held_txt.read_text(encoding="utf-8")
    results = {"machine": machine(), "default_tol": DEFAULT_PREFILL_TOL, "models": {}}
    for name, model in MODELS.items():
        report = json.loads((model / "train_report.json").read_text())
        window = report["seq_len"]
        windows = text_windows(model, held, args.windows * window, window)
        print(f"{name}: {len(windows)} windows of {window} tokens", flush=True)
        r = {"checkpoint": str(model.relative_to(ROOT)), "layer_types": report["layer_types"], "window": window,
             "windows": len(windows)}
        previous = None
        if args.keep_sweep:
            previous = json.loads((RESULTS / "convergence.json").read_text())["models"][name]["reference"]
        r["reference"] = reference_side(model, windows, previous)
        r["vllm"] = vllm_side(model, windows)
        results["models"][name] = r
    write_outputs(results)
    return 0


def write_outputs(results: dict) -> None:
    lines = []
    for name, r in results["models"].items():
        ref = r["reference"]
        lines += [f"**{name}** (`{r['layer_types']}`, {r['windows']} held-out windows of {r['window']} tokens; "
                  f"reference, float64)", "",
                  "| encoding | perplexity | vs m+b passes | passes used per window | max abs dlogprob |",
                  "| --- | ---: | ---: | --- | ---: |",
                  f"| token by token (exact) | {ref['ppl_sequential']:.4f} | "
                  f"{ref['ppl_sequential'] / ref['ppl_m_plus_b'] - 1:+.2e} | - | - |"]
        for k, p in ref["fixed"].items():
            lines.append(f"| {k} fixed pass{'es' if k != '1' else ''} | {p:.4f} | {p / ref['ppl_m_plus_b'] - 1:+.2e} "
                         f"| {k} | - |")
        lines.append(f"| {ref['m_plus_b']} fixed passes (m+b) | {ref['ppl_m_plus_b']:.4f} | 0 | {ref['m_plus_b']} | 0 |")
        for tol, a in ref["adaptive"].items():
            mark = " (default)" if float(tol) == results["default_tol"] else ""
            lines.append(f"| adaptive, tol {tol}{mark} | {a['ppl']:.4f} | {a['rel_to_m_plus_b']:+.2e} | "
                         f"{', '.join(map(str, a['passes']))} (mean {a['mean_passes']:.2f}) | "
                         f"{a['max_abs_dlogprob']:.1e} |")
        for c, p in ref["chunked_default_tol"].items():
            lines.append(f"| chunks of {c}, default tol | {p:.4f} | {p / ref['ppl_m_plus_b'] - 1:+.2e} | - | - |")
        for c, p in ref.get("chunked_looser_tol", {}).items():
            rel = p / ref["ppl_m_plus_b"] - 1
            lines.append(f"| chunks of {c}, tol {ref['looser_tol']} | {p:.4f} | {rel:+.2e} | - | - |")
        for b, v in ref.get("blocks_default_tol", {}).items():
            lines.append(f"| blocks of {b if b != '0' else 'the whole window'}, default tol | {v['ppl']:.4f} | "
                         f"{v['rel_to_m_plus_b']:+.2e} | {v['rows_per_token']:.2f} rows per token | - |")
        lines += ["", "| through vLLM | perplexity | vs exact | prefills by passes used (1..m+b) |",
                  "| --- | ---: | ---: | --- |"]
        for run, v in r["vllm"].items():
            hist = ", ".join(f"{k}: {n}" for k, n in enumerate(v["passes_histogram"]) if n)
            lines.append(f"| {run} | {v['ppl']:.4f} | {v['rel_to_exact']:+.2e} | {hist} |")
        lines.append("")
    write_results(RESULTS / "convergence.json", results, indent=1, markdown="\n".join(lines))
    print("\n".join(lines))

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results["models"].items():
        ref = r["reference"]
        ks = [int(k) for k in ref["fixed"]] + [ref["m_plus_b"]]
        rel = [abs(p / ref["ppl_m_plus_b"] - 1) for p in ref["fixed"].values()] + [0]
        axes[0].semilogy(ks[:-1], [max(x, 1e-9) for x in rel[:-1]], "o-", label=name)
        tols = [float(t) for t in ref["adaptive"]]
        axes[1].semilogx(tols, [a["mean_passes"] for a in ref["adaptive"].values()], "o-", label=name)
    axes[0].axhline(1e-3, color="grey", ls="--", lw=1)
    axes[0].set_xlabel("fixed passes")
    axes[0].set_ylabel("|perplexity / m+b-pass perplexity - 1|")
    axes[0].set_title("held-out perplexity vs passes", fontsize=10)
    axes[1].axvline(results["default_tol"], color="grey", ls="--", lw=1)
    axes[1].set_xlabel("tolerance (relative K/V change)")
    axes[1].set_ylabel("mean passes used per window")
    axes[1].set_title("adaptive passes", fontsize=10)
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    save_figure(fig, RESULTS / "convergence.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
