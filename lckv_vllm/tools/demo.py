"""`make demo`: serve a small trained LCKV model with `vllm serve`, answer one HTTP completion in readable text, and
show its KV bytes per token next to the same model trained with every layer keeping its KV (the identity plan).

The models are committed under `examples/` (6 layers, 3.1M parameters, bf16, ~6 MB each): trained on Shakespeare by
`benchmarks/train_shakespeare.py` with `lckv-vllm train`, one as LCKV w2 (layers 1-4 read layer 4's KV, so 3 of 6
layers keep a cache), one as the identity plan.  Each is served by the real `vllm` console script of the venv
(repaired by `lckv-vllm doctor --fix` on the CPU wheel), so this also shows that a plain `vllm serve MODEL` picks the
plugin up through its entry point.  `LCKV_DEMO_MODEL=DIR` serves that checkpoint alone instead.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

from .harness import BIN, free_port, serve

ROOT = Path(__file__).resolve().parents[2]  # the repository: lckv_vllm/tools/demo.py -> ../..
EXAMPLES = [("LCKV w2", ROOT / "examples" / "shakespeare-lckv-w2"), ("identity", ROOT / "examples" / "shakespeare-identity")]
PROMPT = "ROMEO.\n"
# Sampled (a tiny model's greedy text loops), with a fixed per-request seed: the same answer on every run.
REQUEST = {"prompt": PROMPT, "max_tokens": 48, "temperature": 0.7, "top_p": 0.95, "seed": 0}


def kv_bytes_per_token(model: Path, dtype_bytes: int = 4) -> tuple[int, str, int, int]:
    """(KV bytes per token at `dtype_bytes`, layer_types, layers keeping KV, layers) of a checkpoint."""
    import argparse

    from .deploy import kv_shape, load_config
    from ..plan import plan_from_config

    cfg = load_config(model)
    plan = plan_from_config(argparse.Namespace(**cfg))
    heads, head_dim = kv_shape(cfg)
    return plan.kv_bytes_per_token(heads, head_dim, dtype_bytes), plan.layer_types, len(plan.producers), plan.num_layers


def serve_and_ask(model: Path, name: str) -> str:
    """Start `vllm serve MODEL`, send one completion, stop the server; returns the completion text."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [str(BIN / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "1024", "--served-model-name", name]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    print("$", " ".join(cmd), flush=True)
    # `vllm serve` runs its engine in a child process: stop the group
    with serve(cmd, Path("demo-server.log"), url, env, append=True, stop_timeout=30, stop_group=True) as srv:
        body = dict(REQUEST, model=name)
        print(f"$ curl {url}/v1/completions -d '{json.dumps(body)}'", flush=True)
        answer = srv.complete(body, timeout=60)
        text = answer["choices"][0]["text"]
        if not text or answer["usage"]["completion_tokens"] < 1:
            raise RuntimeError(f"empty completion: {answer}")
        return text


def main() -> int:
    own = os.environ.get("LCKV_DEMO_MODEL")
    models = [("model", Path(own))] if own else EXAMPLES
    for _, path in models:
        if not (path / "config.json").exists():
            print(f"demo: {path} has no config.json (a checkpoint directory is expected)", file=sys.stderr)
            return 1
    open("demo-server.log", "w").close()
    rows = []
    try:
        for label, path in models:
            text = serve_and_ask(path, "lckv-demo")
            rows.append((label, path, text))
            print(f"\n{label} ({path.name}) answers:\n{PROMPT}{text}\n", flush=True)
    except Exception as e:
        print(f"demo failed: {e}; server log: demo-server.log", file=sys.stderr)
        return 1
    print(f"{'model':10s} {'layer_types':14s} {'layers with KV':>15s} {'KV bytes/token (fp32)':>22s} "
          f"{'held-out ppl (training)':>24s}")
    for label, path, _ in rows:
        per_token, layer_types, producers, layers = kv_bytes_per_token(path)
        report = path / "train_report.json"  # written by `lckv-vllm train`
        ppl = f"{math.exp(json.loads(report.read_text())['held_out_loss']):.1f}" if report.exists() else "-"
        print(f"{label:10s} {layer_types:14s} {f'{producers} of {layers}':>15s} {per_token:>22,d} {ppl:>24s}")
    if len(rows) == 2:
        ratio = kv_bytes_per_token(rows[1][1])[0] / kv_bytes_per_token(rows[0][1])[0]
        print(f"{rows[0][0]} stores {1 / ratio:.2f} of the identity plan's KV bytes per token: {ratio:.1f}x the tokens "
              "fit in the same KV cache.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
