"""Run the locust load test against lckv-serve for an LCKV model and its baselines, and write one JSON report.

    .venv/bin/python -m loadtests.run                       # tiny-w2 vs tiny-identity vs vLLM's own Llama
    .venv/bin/python -m loadtests.run --models bench-w2 bench-identity llama:bench-identity --requests 96

A model is a preset name (built into a temporary directory), a checkpoint directory, or `llama:PRESET`: the
identity preset exported as a plain Llama checkpoint, which vLLM serves with its own LlamaForCausalLM (the
baseline of the same shape always runs in the same run).  Every model gets the same server settings (dtype,
block size, KV budget, max_num_seqs) and the same load (users, request count, prompt/output lengths, seed); the
report gives each model's `vllm bench serve`-style numbers and their ratios to the baseline.

Bounded: servers bind 127.0.0.1 only, each load phase stops after --requests requests or --run-time seconds,
whichever comes first, and every server is stopped with SIGTERM before the next one starts.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _prepare(spec: str, tmp: Path) -> tuple[str, Path]:
    from lckv_vllm.tools.checkpoint import PRESETS, export_llama, make_preset

    if spec.startswith("llama:"):
        src = make_preset(spec.split(":", 1)[1], tmp / spec.split(":", 1)[1])
        return spec, export_llama(src, tmp / spec.replace(":", "-"))
    if spec in PRESETS:
        return spec, make_preset(spec, tmp / spec)
    path = Path(spec)
    if not (path / "config.json").exists():
        raise SystemExit(f"run.py: {spec!r} is neither a preset ({', '.join(PRESETS)}), llama:PRESET, nor a "
                         f"checkpoint directory")
    return path.name, path


def _run_one(name: str, path: Path, args, tmp: Path) -> dict:
    from lckv_vllm.tools.harness import (BIN, ServerStartError, free_port, lckv_serve_cmd, read_metrics, serve,
                                         server_env)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / f"{name.replace(':', '-')}-server.log"
    cmd = lckv_serve_cmd(path, port, "--served-model-name", name, "--dtype", args.dtype,
                         "--block-size", str(args.block_size), "--kv-cache-memory-bytes", str(args.kv_bytes),
                         "--max-num-seqs", str(args.users),
                         "--max-model-len", str(args.prompt_tokens * 2 + args.max_tokens + 64),
                         "--seed", str(args.seed))
    env = server_env(TOKENIZERS_PARALLELISM="false")
    print(f"[{name}] starting lckv-serve on {url}", flush=True)
    # one warm-up request so that the first measured TTFT is not the engine's first-step set-up
    try:
        with serve(cmd, log, url, env, name=name, timeout=300, tail=30, warmup={"prompt": "warm up", "max_tokens": 2},
                   warmup_timeout=120):
            out = tmp / f"{name.replace(':', '-')}-load.json"
            load_env = dict(env, LCKV_LOAD_MODEL=name, LCKV_LOAD_PROMPT_TOKENS=str(args.prompt_tokens),
                            LCKV_LOAD_MAX_TOKENS=str(args.max_tokens), LCKV_LOAD_REQUESTS=str(args.requests),
                            LCKV_LOAD_SEED=str(args.seed), LCKV_LOAD_OUT=str(out))
            locust = [str(BIN / "locust"), "-f", str(HERE / "locustfile.py"), "--headless", "-H", url,
                      "-u", str(args.users), "-r", str(args.users), "-t", f"{args.run_time}s",
                      "--stop-timeout", "30", "--only-summary", "--loglevel", "WARNING"]
            print(f"[{name}] locust: {args.users} users, {args.requests} requests, at most {args.run_time} s",
                  flush=True)
            subprocess.run(locust, env=load_env, timeout=args.run_time + 120, check=False,
                           stdout=subprocess.DEVNULL)
            result = json.loads(out.read_text())
            kv = {k: v for k, v in read_metrics(url).items()
                  if k.startswith(("lckv_kv_", "lckv_requests_total"))}
            result["kv"] = {k.removeprefix("lckv_kv_"): v for k, v in kv.items() if k.startswith("lckv_kv_")}
            return result
    except ServerStartError as e:
        raise SystemExit(str(e)) from None


def _ratios(result: dict, base: dict) -> dict:
    def r(a, b):
        return a / b if a is not None and b else None

    out = {k: r(result.get(k), base.get(k)) for k in ("request_throughput_per_s", "output_token_throughput_per_s")}
    for m in ("ttft", "tpot", "itl", "e2el"):
        out[f"{m}_mean"] = r(result[m]["mean_ms"], base[m]["mean_ms"])
    out["kv_capacity_tokens"] = r(result["kv"].get("capacity_tokens"), base["kv"].get("capacity_tokens"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["tiny-w2", "tiny-identity", "llama:tiny-identity"])
    p.add_argument("--baseline", default=None, help="model the ratios refer to (default: the last one)")
    p.add_argument("--users", type=int, default=4)
    p.add_argument("--requests", type=int, default=48)
    p.add_argument("--run-time", type=int, default=120, help="seconds per model, at most")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--block-size", type=int, default=32, help="a multiple of 32: vLLM's CPU_ATTN (the Llama "
                   "baseline on CPU) accepts no other")
    p.add_argument("--kv-bytes", type=int, default=128 << 20, help="KV cache budget per server, bytes")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (default: print only)")
    args = p.parse_args(argv)

    import torch

    from lckv_vllm.tools.harness import machine, write_results

    report = {
        "setup": {**machine(short=True), "torch": torch.__version__, "dtype": args.dtype,
                  "block_size": args.block_size, "kv_cache_bytes": args.kv_bytes, "users": args.users,
                  "requests": args.requests, "prompt_tokens": args.prompt_tokens, "max_tokens": args.max_tokens, "seed": args.seed},
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="lckv-load-") as d:
        tmp = Path(d)
        for spec in args.models:
            name, path = _prepare(spec, tmp)
            report["models"][name] = _run_one(name, path, args, tmp)
    base_name = args.baseline or list(report["models"])[-1]
    base = report["models"][base_name]
    report["ratios_vs"] = base_name
    for name, res in report["models"].items():
        res["ratios"] = _ratios(res, base)
    print(json.dumps(report, indent=2))
    if args.out:
        write_results(args.out, report)
    failed = sum(r["failed"] for r in report["models"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
