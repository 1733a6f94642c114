"""Plot a `kernels/bench.py` result (JSON) as a PNG: decode bandwidth and prefill throughput, ours against vLLM's
own Triton attention, strict (LCKV consumers) and causal (producers) modes.

    python -m benchmarks.plot_kernels benchmarks/results/kernels_bf16.json     # writes kernels_bf16.png beside it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lckv_vllm.tools.harness import pyplot


def main(path: str) -> int:
    plt = pyplot()

    src = Path(path)
    rep = json.loads(src.read_text())
    rows = rep["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.8))
    contexts = sorted({r["context"] for r in rows if r["kind"] == "decode"})
    colors = dict(zip(contexts, ["tab:blue", "tab:orange", "tab:green", "tab:red"]))
    for ctx in contexts:
        for mode, style in (("strict", "-"), ("causal", ":")):
            sel = sorted((r for r in rows if r["kind"] == "decode" and r["context"] == ctx and r["mode"] == mode),
                         key=lambda r: r["batch"])
            b = [r["batch"] for r in sel]
            a1.plot(b, [100 * r["ours_frac_of_copy"] for r in sel], style, marker="o", color=colors[ctx],
                    label=f"ours {mode}, ctx {ctx}")
            if mode == "strict" and all("vllm_frac_of_copy" in r for r in sel):
                a1.plot(b, [100 * r["vllm_frac_of_copy"] for r in sel], "--", marker="x", color=colors[ctx],
                        alpha=0.6, label=f"vLLM (seq_lens-1), ctx {ctx}")
    a1.set_xscale("log", base=2)
    a1.set_xlabel("batch (one query per sequence)")
    a1.set_ylabel("% of device-to-device copy bandwidth")
    a1.set_title(f"decode: {rep['copy_bandwidth_GBps']:.0f} GB/s copy = 100 %")
    a1.legend(fontsize=7, ncol=2)

    pre = [r for r in rows if r["kind"] != "decode" and r["mode"] == "strict"]
    labels = [f"{r['kind']}\n{r['batch']}x{r['query_len']}" + (f"\n+ctx {r['context']}" if r["context"] else "")
              for r in pre]
    x = range(len(pre))
    a2.bar([i - 0.2 for i in x], [r["ours_TFLOPs"] for r in pre], width=0.4, label="ours (strict)")
    if all("vllm_TFLOPs" in r for r in pre):
        a2.bar([i + 0.2 for i in x], [r["vllm_TFLOPs"] for r in pre], width=0.4, label="vLLM Triton (seq_lens-1)")
    a2.set_xticks(list(x), labels, fontsize=7)
    a2.set_ylabel("TFLOP/s (visible query-key pairs)")
    a2.set_title("prefill / mixed")
    a2.legend(fontsize=8)
    fig.suptitle(f"{rep['device']}, {rep['dtype']}, {rep['num_heads']} q / {rep['num_kv_heads']} KV heads of "
                 f"{rep['head_size']}, block {rep['block_size']}; torch {rep['torch']}, triton {rep['triton']}",
                 fontsize=9)
    fig.tight_layout()
    out = src.with_suffix(".png")
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/kernels_bf16.json"))
