"""Prefill/decode disaggregation through vLLM's KV connector API: `LCKVStorageConnector` moves producers only.

A prefill engine (`kv_producer`) encodes each prompt and saves its KV to a shared folder; a decode engine
(`kv_consumer`, started afterwards in the same process: vLLM keeps one connector per process) loads it and
generates.  Oracles: the float64 reference (acyclic plans: any split is exact; cyclic plans: the chunk-by-chunk
encoding split at the transfer point, visibly different from whole-prompt on these random models), the files the
prefill engine wrote (producer layers exactly), and their bytes (LCKV / identity = producers / layers).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import BLOCK_SIZE, random_prompt
from lckv_vllm.reference_model import ReferenceModel

# transferred: the whole blocks before the last prompt token (32, 48, 64 tokens); 65 = 1 (mod 16) is the length
# ExampleConnector stores under one key and looks up under another (the plugin's connector looks up what it stored)
LENGTHS = (40, 65, 70)
GEN = 16
MAX_DLOGPROB = 1e-3
HERE = Path(__file__).resolve().parent
PRESETS = ("tiny-identity", "tiny-cla", "tiny-w2")


def run_jobs(jobs: list[dict]) -> list[dict]:
    """Engines with KV connectors, one after another in a process of their own (kv_transfer_run.py)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(jobs, f)
    r = subprocess.run([sys.executable, str(HERE / "kv_transfer_run.py"), f.name], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _transferred(n: int) -> int:
    return (n - 2) // BLOCK_SIZE * BLOCK_SIZE  # ExampleConnector: whole blocks of the prompt minus its last token


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    """Per preset: the files the prefill engine saved, its stats, and the decode engine's outputs and stats; then a
    decode engine of another plan over w2's KV, and a w2 decode engine given a prompt nobody prefilled."""
    prompts = [random_prompt(n, seed=900 + n) for n in LENGTHS]
    storage = {p: str(tmp_path_factory.mktemp(f"kv-{p}")) for p in PRESETS}
    job = lambda preset, role, **kw: dict(path=str(model_dir(preset)), role=role, storage=storage[preset],  # noqa
                                          prompts=prompts, max_tokens=GEN if role == "kv_consumer" else 1, **kw)
    produced = run_jobs([job(p, "kv_producer") for p in PRESETS])
    files = {p: {d.name: {f.name: f.stat().st_size for f in d.iterdir()} for d in Path(storage[p]).iterdir()
                 if d.is_dir()} for p in PRESETS}
    manifests = {p: json.loads((Path(storage[p]) / "lckv_manifest.json").read_text()) for p in PRESETS}
    fresh = random_prompt(50, seed=999)
    consumed = run_jobs([job(p, "kv_consumer") for p in PRESETS] + [
        dict(job("tiny-w2", "kv_consumer"), prompts=[fresh]),
        dict(job("tiny-w2", "kv_consumer"), path=str(model_dir("tiny-identity")))])
    out = {p: dict(prompts=prompts, files=files[p], manifest=manifests[p], saved=produced[k]["worker"],
                   loaded=consumed[k]["worker"], got=consumed[k]["outputs"]) for k, p in enumerate(PRESETS)}
    out["local"] = dict(prompt=fresh, **consumed[3])
    out["mismatch"] = consumed[4]
    return out


@pytest.mark.parametrize("preset", ["tiny-identity", "tiny-cla", "tiny-w2"])
def test_prefill_instance_saves_exactly_the_producers(runs, model_dir, preset):
    r = runs[preset]
    plan = ReferenceModel(model_dir(preset)).plan
    expected = {f"model.layers.{p}.self_attn.attn.safetensors" for p in plan.producers}
    assert len(r["files"]) == len(LENGTHS)  # one folder per prompt
    for names in r["files"].values():
        assert set(names) == expected
    assert r["manifest"]["producers"] == list(plan.producers)
    assert r["saved"]["saved_layers"] == len(plan.producers) * len(LENGTHS)  # once per producer, not per pass


@pytest.mark.parametrize("preset", ["tiny-identity", "tiny-cla", "tiny-w2"])
def test_decode_instance_loads_and_matches_the_reference(runs, model_dir, preset):
    r = runs[preset]
    ref = ReferenceModel(model_dir(preset))
    # blocks loaded: whole blocks of the prompt (the decode instance recomputes from the transfer point on)
    assert r["loaded"]["loaded_tokens"] == sum((n - 1) // BLOCK_SIZE * BLOCK_SIZE for n in LENGTHS)
    for p, (toks, lps) in zip(r["prompts"], r["got"]):
        hit = _transferred(len(p))
        # the decode instance encodes the rest of the prompt on top of the transferred KV: a chunk
        rtoks, rlps = ref.generate(p, GEN, chunk_sizes=[hit, len(p) - hit])
        assert toks == rtoks
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < MAX_DLOGPROB
        if ref.plan.is_cyclic:  # and the oracle can tell: whole-prompt encoding differs on this random model
            wtoks, wlps = ref.generate(p, GEN)
            assert wtoks != rtoks or max(abs(a - b) for a, b in zip(wlps, rlps)) > 1e-2


def test_bytes_moved_follow_the_plan(runs, model_dir):
    """Bytes on disk per prompt: LCKV / identity = producers / layers (safetensors headers aside)."""
    def payload(preset):
        return sum(sum(f.values()) for f in runs[preset]["files"].values())

    ident = payload("tiny-identity")
    for preset in ("tiny-cla", "tiny-w2"):
        plan = ReferenceModel(model_dir(preset)).plan
        assert payload(preset) / ident == pytest.approx(len(plan.producers) / plan.num_layers, rel=0.02)
    saved = runs["tiny-w2"]["saved"]
    assert saved["saved_bytes"] == runs["tiny-w2"]["loaded"]["loaded_bytes"]


def test_mismatched_model_refused_and_missing_transfer_prefilled_locally(runs, model_dir):
    # another plan over the same KV: refused at start-up, naming the field
    assert "layer_types is '0_4_4_4_4_5' there" in runs["mismatch"]["error"], runs["mismatch"]
    # a prompt nobody prefilled: encoded locally (the scheduler's connector counts it, and logs it)
    local = runs["local"]
    assert local["scheduler"]["local_prefills"] == 1 and local["worker"]["loaded_tokens"] == 0
    assert local["outputs"][0][0] == ReferenceModel(model_dir("tiny-w2")).generate(local["prompt"], GEN)[0]


def test_fp8_pages_transfer_a_quarter_of_the_bytes(tmp_path):
    """fp8 pages move as they are: a quarter of the float32 bytes per transferred token, and the decode instance
    equals the fp8 reference split at the transfer point (trained w2: converged, so the comparison is tight).  A
    decode instance with float32 pages refuses fp8 KV (the manifest names the page dtype)."""
    from conftest import TRAINED_W2, text_prompts

    prompts = [p[:n] for p, n in zip(text_prompts(TRAINED_W2, 2, 70), (40, 70))]
    job = lambda storage, role, dtype: dict(path=str(TRAINED_W2), role=role, storage=str(tmp_path / storage),  # noqa
                                            prompts=prompts, max_tokens=GEN if role == "kv_consumer" else 1,
                                            kv_cache_dtype=dtype, block_size=32)
    produced = run_jobs([job("fp8", "kv_producer", "fp8"), job("f32", "kv_producer", "auto")])
    fp8, f32, wrong = run_jobs([job("fp8", "kv_consumer", "fp8"), job("f32", "kv_consumer", "auto"),
                                job("fp8", "kv_consumer", "auto")])
    assert produced[0]["worker"]["saved_bytes"] * 4 == produced[1]["worker"]["saved_bytes"] > 0
    assert fp8["worker"]["loaded_bytes"] * 4 == f32["worker"]["loaded_bytes"] > 0
    assert "kv_cache_dtype is 'fp8' there, 'auto' here" in wrong["error"], wrong
    from lckv_vllm.engine.attention.cpu_path import unsupported_reason
    from lckv_vllm.engine.attention.page_dtype import PageDtype

    # the default path: vLLM's CPU kernels (round toward zero) where the CPU has their fp8 variant, else torch
    cpu = unsupported_reason(32, None, 32, PageDtype("fp8")) is None
    ref = ReferenceModel(TRAINED_W2, kv_cache_dtype="fp8", kv_rounding="toward_zero" if cpu else "nearest")
    diffs = []
    for p, (toks, lps) in zip(prompts, fp8["outputs"]):
        hit = (len(p) - 2) // 32 * 32
        rtoks, rlps = ref.generate(p, GEN, chunk_sizes=[hit, len(p) - hit])
        assert toks == rtoks
        diffs += [abs(a - b) for a, b in zip(lps, rlps)]
    # median and max as in tests/test_fp8_pages.py (a float32/float64 rounding-boundary flip moves a few by ~1e-2)
    assert sorted(diffs)[len(diffs) // 2] < 1e-5 and max(diffs) < 0.05, diffs


def test_setups_the_connector_cannot_serve_are_refused():
    from types import SimpleNamespace

    from lckv_vllm.engine.connector import KVTransferConfigError, check_setup

    hf = SimpleNamespace(num_hidden_layers=3, lckv_layer_types="0_2_2", max_position_embeddings=256)
    cfg = lambda tp=1, **extra: SimpleNamespace(  # noqa: E731
        parallel_config=SimpleNamespace(tensor_parallel_size=tp),
        model_config=SimpleNamespace(hf_config=SimpleNamespace(**vars(hf), **extra)))
    one_group = SimpleNamespace(kv_cache_groups=[object()])
    check_setup(cfg(), one_group)  # servable
    with pytest.raises(KVTransferConfigError, match="kv_transfer_config: .* 2 tensor-parallel ranks"):
        check_setup(cfg(tp=2), one_group)
    with pytest.raises(KVTransferConfigError, match="one KV-cache group, this model has 2 .*LCKV_WINDOWED_PAGES=0"):
        check_setup(cfg(), SimpleNamespace(kv_cache_groups=[object(), object()]))
    with pytest.raises(KVTransferConfigError, match="lckv_streaming"):
        check_setup(cfg(lckv_streaming={"sink_tokens": 4, "window": 16}), one_group)
