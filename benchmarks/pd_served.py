"""The prefill/decode flow served: two `vllm serve` processes sharing producer KV, a client doing both steps.

Starts the trained `examples/shakespeare-lckv-w2` (or `--model DIR`) twice with the plugin's `LCKVStorageConnector`
over one folder, one instance `kv_producer` (prefill), one `kv_consumer` (decode), each `vllm serve` exactly as
docs/serving.md shows; then, per prompt, the client flow: POST the prompt to the prefill instance with max_tokens 1,
then to the decode instance with max_tokens `--gen` (streamed: TTFT is its first token); a third, plain instance
(no connector) answers the same prompt from scratch: the single-instance baseline.  Records answers (equal for a
converged checkpoint: the decode instance encodes the prompt's tail as a chunk on top of the transferred KV), TTFTs,
the files the prefill instance wrote (producer layers only), and whether the decode instance logged a local prefill
for a prompt nobody prefilled.

    .venv/bin/python -m benchmarks.pd_served [--model DIR] [--gen 32]   -> benchmarks/results/pd_served.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import urllib.request
from pathlib import Path

from lckv_vllm.tools.harness import command_line, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPTS = [
    "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, fair "
    "sun, and kill the envious moon, who is already sick and pale with grief.\n\nJULIET:\n",
    "KING RICHARD III:\nNow is the winter of our discontent made glorious summer by this sun of York; and all the "
    "clouds that lour'd upon our house in the deep bosom of the ocean buried.\n\nGLOUCESTER:\n",
]


def serve(model: Path, role: str | None, storage: Path, log: Path):
    """A started `vllm serve` (harness.Server) for `role` (None: no connector)."""
    from lckv_vllm.tools.harness import free_port, start_server

    port = free_port()
    kv = {"kv_connector": "LCKVStorageConnector", "kv_connector_module_path": "lckv_vllm.engine.connector",
          "kv_role": role, "kv_connector_extra_config": {"shared_storage_path": str(storage)}}
    cmd = [str(Path(sys.executable).parent / "vllm"), "serve", str(model), "--host", "127.0.0.1", "--port", str(port),
           "--dtype", "float32", "--max-model-len", "1024", "--served-model-name", "m"]
    if role is not None:
        cmd += ["--kv-transfer-config", json.dumps(kv)]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    print("$", " ".join(cmd[1:]), flush=True)
    return start_server(cmd, log, f"http://127.0.0.1:{port}", env)


def complete(url: str, prompt: str, max_tokens: int) -> tuple[str, float, float]:
    """(text, seconds to the first streamed token, seconds in all)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0, first, text = time.perf_counter(), None, ""
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])["choices"][0]["text"]
            if chunk and first is None:
                first = time.perf_counter() - t0
            text += chunk
    return text, first or 0.0, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=ROOT / "examples" / "shakespeare-lckv-w2")
    ap.add_argument("--gen", type=int, default=32)
    args = ap.parse_args()
    from lckv_vllm.tools.harness import machine

    work = ROOT / "models" / "pd-served"
    storage = work / "kv"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    servers = []
    try:
        for role, log in (("kv_producer", "prefill.log"), ("kv_consumer", "decode.log"), (None, "single.log")):
            servers.append(serve(args.model, role, storage, work / log))
        p_url, d_url, s_url = (s.url for s in servers)
        for url in (p_url, d_url, s_url):
            complete(url, "warm up", 1)
        complete(d_url, "Nobody prefilled this prompt, so the decode instance encodes it itself.", 1)
        rows = []
        for prompt in PROMPTS:
            _, p_first, p_all = complete(p_url, prompt, 1)
            text, d_first, _ = complete(d_url, prompt, args.gen)
            single, s_first, _ = complete(s_url, prompt, args.gen)
            rows.append({"prompt": prompt, "pd_answer": text, "single_answer": single, "equal": text == single,
                         "prefill_s": round(p_all, 4), "decode_ttft_s": round(d_first, 4),
                         "pd_ttft_s": round(p_all + d_first, 4), "single_ttft_s": round(s_first, 4)})
            print(json.dumps(rows[-1], indent=1), flush=True)
    finally:
        for s in servers:
            s.stop(30, group=True)  # `vllm serve` runs its engine in a child process: stop the group
    files = sorted({f.name for d in storage.iterdir() if d.is_dir() for f in d.iterdir()})
    decode_log = (work / "decode.log").read_text(errors="replace")
    result = {"command": command_line("benchmarks.pd_served"), "machine": machine(),
              "model": str(args.model.relative_to(ROOT)) if args.model.is_relative_to(ROOT) else str(args.model),
              "layer_files_saved": files, "manifest": json.loads((storage / "lckv_manifest.json").read_text()),
              "local_prefill_logged": "prefilling it locally" in decode_log, "requests": rows}
    write_results(HERE / "results" / "pd_served.json", result, indent=2)
    print("saved layer files:", files)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
