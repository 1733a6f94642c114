"""Fuzz lckv-serve with schemathesis, driven by the server's own /openapi.json: no 5xx, and every response conforms.

    .venv/bin/python -m loadtests.fuzz --examples 300 --out benchmarks/results/fuzz.json
    .venv/bin/python -m loadtests.fuzz --url http://127.0.0.1:8000 --api-key KEY --examples 50

Without --url the script starts lckv-serve on a tiny model (preset tiny-w2, built in a temporary directory) with
small caps (--max-n 4, --max-tokens-limit 16) so that each generated request costs little, and stops it at the
end.  For every operation of the document and both generation modes (positive: requests the schema allows;
negative: requests it forbids), hypothesis generates up to --examples cases (fixed seed, no shrinking) and each
answer is checked with schemathesis' checks: not_a_server_error (no 5xx), status_code_conformance (a documented
status), content_type_conformance, response_schema_conformance, and for negative cases negative_data_rejection
(a 4xx).  After the run the server must still be healthy and answer a normal request.  The report (JSON) gives
per operation and mode the number of cases, the statuses seen and every failure with a curl command to replay it
(the key shown as $LCKV_API_KEY).  tests/test_server_hostile.py runs the same function with a few examples.

Loopback only: the URL must be http://127.0.0.1 or localhost.  Bounded: cases per operation and mode, and a
per-request timeout.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse


LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SERVER_ARGS = ["--max-model-len", "256", "--max-num-seqs", "16", "--kv-cache-memory-bytes", str(64 << 20),
               "--max-n", "4", "--max-tokens-limit", "16", "--enforce-eager"]


def _checks():
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        negative_data_rejection,
        response_schema_conformance,
        status_code_conformance,
    )

    return [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
            negative_data_rejection]


def fuzz(base_url: str, api_key: str | None, *, examples: int, seed: int = 0, modes=("positive", "negative"),
         timeout: float = 60.0, log=print, debug: bool = False) -> dict:
    """Run the fuzzer against a running server; return the report (see the module docstring)."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis.errors import Unsatisfiable
    from schemathesis.core.failures import FailureGroup
    from schemathesis.generation import GenerationMode

    if urlparse(base_url).hostname not in LOOPBACK:
        raise SystemExit(f"fuzz: refusing to fuzz {base_url!r}: loopback only")
    schema = schemathesis.openapi.from_url(base_url + "/openapi.json", timeout=30)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    shown_auth = {"Authorization": "Bearer $LCKV_API_KEY"} if api_key else {}
    checks = _checks()
    report: dict = {"base_url": base_url, "examples_per_operation_and_mode": examples, "seed": seed,
                    "checks": [c.__name__ for c in checks], "operations": {}, "failures": []}
    t0 = time.monotonic()
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        for mode in modes:
            gen_mode = GenerationMode(mode)
            counts: collections.Counter = collections.Counter()
            failures: list = []

            def one(case):
                counts["cases"] += 1
                try:
                    response = case.call(base_url=base_url, headers=auth, timeout=timeout)
                except Exception as e:  # noqa: BLE001 - a dropped connection or a timeout is a failure too
                    counts["error"] += 1
                    failures.append({"operation": label, "mode": mode, "status": None,
                                     "failure": f"{type(e).__name__}: {str(e)[:300]}",
                                     "curl": case.as_curl_command(headers=shown_auth)})
                    return
                counts[str(response.status_code)] += 1
                if debug and response.status_code >= 400 and mode == "positive":
                    log(f"  {label} {response.status_code}: {response.text[:200]}")
                try:
                    case.validate_response(response, checks=checks, headers=auth)
                except FailureGroup as group:
                    failures.append({"operation": label, "mode": mode, "status": response.status_code,
                                     "failure": "; ".join(sorted({f.title for f in group.exceptions})),
                                     "response": response.text[:300],
                                     "curl": case.as_curl_command(headers=shown_auth)})

            strategy = op.as_strategy(generation_mode=gen_mode)
            run = settings(max_examples=examples, deadline=None, database=None, derandomize=False,
                           phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck),
                           print_blob=False)(hseed(seed)(given(case=strategy)(one)))
            started = time.monotonic()
            try:
                run()
            except Unsatisfiable:  # nothing to negate: an operation without parameters or body
                pass
            entry = report["operations"].setdefault(label, {})
            entry[mode] = {"cases": counts.pop("cases", 0), "statuses": dict(sorted(counts.items())),
                           "failures": len(failures), "seconds": round(time.monotonic() - started, 1)}
            report["failures"].extend(failures)
            log(f"fuzz: {label:32s} {mode:8s} {entry[mode]['cases']:4d} cases, statuses "
                f"{entry[mode]['statuses']}, {len(failures)} failures")
    report["cases"] = sum(m["cases"] for e in report["operations"].values() for m in e.values())
    report["failure_count"] = len(report["failures"])
    report["seconds"] = round(time.monotonic() - t0, 1)
    return report


def after_check(base_url: str, api_key: str | None, model: str) -> dict:
    """The server after the run: /health, and a normal request."""
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    health = httpx.get(base_url + "/health", timeout=30).status_code
    r = httpx.post(base_url + "/v1/completions", headers=headers, timeout=120,
                   json={"model": model, "prompt": "still there?", "max_tokens": 4, "ignore_eos": True})
    ok = r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
    return {"health_status": health, "normal_request_ok": ok}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="fuzz this running server (default: start one on --model)")
    p.add_argument("--api-key", default=None, help="its API key (with --url); a started server gets a random one")
    p.add_argument("--model", default="tiny-w2", help="preset or checkpoint directory for the started server")
    p.add_argument("--served-name", default="tiny", help="served model name (with --url: the server's)")
    p.add_argument("--examples", type=int, default=200, help="cases per operation and mode (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON report (default: print a summary only)")
    args = p.parse_args(argv)

    from loadtests.common import command_line, write_results, machine, model_path, start_server

    srv = None
    report: dict = {}
    with tempfile.TemporaryDirectory(prefix="lckv-fuzz-") as d:
        tmp = Path(d)
        url, key = args.url, args.api_key
        if url is None:
            import secrets

            key = secrets.token_hex(16)
            srv = start_server(model_path(args.model, tmp), tmp / "server.log", name=args.served_name, api_key=key,
                               extra=SERVER_ARGS)
            url = srv.url
        try:
            report = fuzz(url, key, examples=args.examples, seed=args.seed)
            report["after"] = after_check(url, key, args.served_name)
        finally:
            if srv is not None:
                report["server_exit_code"] = srv.stop()
                log_text = srv.log.read_text(errors="replace")
                report["server_log_has_traceback"] = "Traceback" in log_text
                report["server_log_has_api_key"] = key in log_text
    report["setup"] = {**machine(), "server_args": None if args.url else SERVER_ARGS, "model": args.model,
                       "command": command_line("loadtests.fuzz", argv)}
    report["base_url"] = "http://127.0.0.1:<port>"
    if args.out:
        write_results(args.out, report)
    print(f"fuzz: {report['cases']} cases over {len(report['operations'])} operations, "
          f"{report['failure_count']} failures, {report['seconds']} s; after: {report['after']}")
    for f in report["failures"][:20]:
        print(json.dumps(f))
    ok = not report["failures"] and report["after"]["health_status"] == 200 and report["after"]["normal_request_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
