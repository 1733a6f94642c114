"""`lckv-vllm bench` on tiny configurations: it runs end to end in seconds and writes JSON (every field), markdown and
non-empty PNGs.  The numbers themselves are not checked (a shared 2-core machine); the benchmark reports them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lckv_vllm import cli

pytestmark = pytest.mark.timeout(600)
BIN = Path(sys.executable).parent

POINT_FIELDS = ("kv_budget_bytes", "kv_capacity_tokens", "kv_blocks", "fits_sequences", "max_concurrency",
                "mean_concurrency", "preemptions", "output_throughput", "request_throughput",
                "total_token_throughput", "duration_s", "rounds", "vs_identity", "vs_llama", "vs_ceiling")
LATENCY_FIELDS = tuple(f"{s}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for s in ("mean", "p50", "p99"))
RATIO_FIELDS = ("output_throughput", "request_throughput", "max_concurrency", "kv_capacity_tokens") + LATENCY_FIELDS
TINY = ["--shape", "tiny", "--paper", "8:24", "--heavy", "32:8", "--requests", "4", "--no-progress"]


def _png(path: Path) -> None:
    assert path.exists() and path.stat().st_size > 1000, path
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _check_result(r: dict, *, references: tuple[str, ...]) -> None:
    missing = [f for f in POINT_FIELDS + LATENCY_FIELDS if f not in r]
    assert not missing, missing
    assert r["output_throughput"] > 0 and r["kv_capacity_tokens"] > 0 and r["max_concurrency"] >= 1
    assert r["preemptions"] is not None and r["preemptions"] >= 0
    for f in LATENCY_FIELDS:
        assert r[f] is not None and r[f] >= 0, f
    for ref in references:
        ratios = r[f"vs_{ref}"]
        assert set(RATIO_FIELDS) <= set(ratios), ref
        assert ratios["output_throughput"] > 0 and ratios["kv_capacity_tokens"] > 0


def test_bench_offline_and_prefill(tmp_path):
    """Configuration 1: three plans and vLLM's Llama in one process, two budgets + no limit, two workloads, the
    prefill comparison (the command line, in this process)."""
    out = tmp_path / "out"
    rc = cli.main(["bench", *TINY, "--plans", "w2,cla", "--budgets", "1,2", "--target-budget", "2", "--rounds", "1",
                   "--prefill-lens", "16,64", "--prefill-reps", "1", "--no-served", "--out", str(out),
                   "--workdir", str(tmp_path / "work")])
    assert rc == 0
    rep = json.loads((out / "bench.json").read_text())
    assert {"machine", "settings", "offline", "prefill", "targets", "elapsed_s"} <= set(rep)
    for k in ("cpu", "cores", "torch", "vllm", "lckv_vllm"):
        assert rep["machine"][k]
    s = rep["settings"]
    assert s["dtype"] == "float32" and s["block_size"] == 32 and s["seed"] == 0
    assert [b["label"] for b in s["budgets"]] == ["1 seq", "2 seq", "no limit"]
    assert set(s["plans"]) == {"identity", "w2", "cla"} and s["plans"]["w2"]["producers"] == 3

    assert set(rep["offline"]) == {"paper", "prompt-heavy"}
    paper = rep["offline"]["paper"]["points"]
    assert [p["label"] for p in paper] == ["1 seq", "2 seq", "no limit"]
    for p in paper:
        assert set(p["engines"]) == {"llama", "identity", "w2", "cla", "ceiling"}
        for r in p["engines"].values():
            _check_result(r, references=("identity", "llama", "ceiling"))
        eng = p["engines"]
        # capacity follows the plan: w2 keeps 3 of 6 layers, CLA 3 of 6; the ceiling has the whole allocation
        assert eng["w2"]["kv_capacity_tokens"] >= 2 * eng["llama"]["kv_capacity_tokens"] - 32
        assert eng["identity"]["kv_capacity_tokens"] == eng["llama"]["kv_capacity_tokens"]
        assert eng["ceiling"]["fits_sequences"] >= 4 and eng["ceiling"]["preemptions"] == 0
    assert paper[0]["engines"]["llama"]["fits_sequences"] == 1 and paper[0]["engines"]["llama"]["max_concurrency"] <= 2
    heavy = rep["offline"]["prompt-heavy"]["points"]
    assert heavy[0]["skipped"] and not heavy[0]["engines"]  # 40 tokens do not fit a 1-sequence (32-token) budget
    assert all(p["engines"] for p in heavy[1:])

    pf = rep["prefill"]
    assert pf["lengths"] == [16, 64] and set(pf["plans"]) == {"llama", "identity", "w2", "cla"}
    for name, r in pf["plans"].items():
        for k in ("ttft_ms", "ratio_vs_identity", "ratio_vs_llama", "analytic_ratio", "analytic_ratio_pass_economy"):
            assert set(r[k]) == {"16", "64"}, (name, k)
    # w2 on 6 layers: [1,5) cyclic, 9 passes -> (4 x 9 + 2) / 6
    assert pf["plans"]["w2"]["analytic_ratio"]["64"] == pytest.approx((4 * 9 + 2) / 6)
    assert pf["plans"]["cla"]["analytic_ratio"]["64"] == 1.0
    be = pf["break_even"]
    assert set(be["plans"]) == {"w2", "cla"} and be["reference_prompt_len"] in (16, 64)
    t = rep["targets"]
    assert "offline w2 / ceiling output tok/s" in t["values"] and t["llama_fits"] == 2

    for name in ("bench_batch.png", "bench_budget.png", "bench_prefill.png"):
        _png(out / name)
    md = (out / "bench.md").read_text()
    assert "| 2 seq | LCKV w2 |" in md and "**Prefill**" in md and "skipped" in md


def test_bench_served_smoke(tmp_path):
    """Configuration 2: the console command, served part only: lckv-serve with w2 at the target budget, a
    fixed-rate load of 4 requests, and its JSON, markdown and plot."""
    out = tmp_path / "out"
    r = subprocess.run([str(BIN / "lckv-vllm"), "bench", *TINY, "--plans", "w2", "--heavy", "none", "--budgets", "2",
                        "--target-budget", "2", "--no-offline", "--served-models", "w2", "--served-requests", "4",
                        "--rate", "8", "--out", str(out), "--workdir", str(tmp_path / "work")],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "**Served**" in r.stdout
    rep = json.loads((out / "bench.json").read_text())
    sv = rep["served"]
    assert sv["rate_per_s"] == 8 and sv["budget_label"] == "2 seq"
    w2 = sv["workloads"]["paper"]["models"]["w2"]
    _check_result(w2, references=())
    assert w2["rounds"][0]["completed"] == 4 and w2["rounds"][0]["failed"] == 0
    assert w2["rounds"][0]["total_output_tokens"] == 4 * 24
    assert w2["kv_capacity_tokens"] > 0 and w2["vs_llama"] is None
    _png(out / "bench_served.png")
