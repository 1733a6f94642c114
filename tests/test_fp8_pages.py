"""fp8 KV pages (`--kv-cache-dtype fp8` / `fp8_e4m3` / `fp8_e5m2`): the page stores fp8(x / scale), every read sees
fp8 * scale (docs/semantics.md, "fp8 pages").

Oracles: the float64 reference with the same quantization (`ReferenceModel(kv_cache_dtype=..., kv_rounding=...)`,
written from the formats' value tables, not with the engine's code), on the trained examples (their iterative
prefill converges, so the comparison is not drowned by a random model's chaos).  The engine computes in float32, the
reference in float64: an element within one float32 rounding error of the midpoint between two fp8 values can land
on either side, one fp8 step apart (measured: once in 8 streams of 40 tokens, |dlogprob| 8e-3 on the tokens after
it).  So the check is statistical and still sharp: greedy tokens agree on >= 90 % of the generated positions, the
median |dlogprob| is < 1e-5 (measured ~8e-7) and none is > 0.05; the unquantized reference and the reference with
the other rounding have medians >= 5e-3 (measured), so a path that ignored the page dtype, the scales or the
rounding fails.  The rounding each path declares is checked against vLLM's CPU kernels byte for byte.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from conftest import TRAINED_W2, ROOT, generate, model_of, text_prompts
from lckv_vllm.engine.attention.page_dtype import PageDtype
from lckv_vllm.reference_model import ReferenceModel, fp8_round_trip

IDENTITY = ROOT / "examples" / "shakespeare-identity"
LENGTHS = (1, 5, 9, 30, 70)  # m+b = 9 for w2
MEDIAN_DLOGPROB = 1e-5  # measured ~8e-7 against the matching reference
MAX_DLOGPROB = 0.05  # one rounding-boundary flip (module docstring)
MIN_AGREEMENT = 0.9  # share of generated positions before the greedy tokens part
MIN_FP8_EFFECT = 1e-3  # median |dlogprob| against the wrong reference: measured 5e-3 - 1.8e-2
ROUNDING = {"torch": "nearest", "triton": "nearest", "cpu": "toward_zero"}
_refs: dict = {}


def _reference(model, fmt, rounding, overrides=None):
    key = (str(model), fmt, rounding, repr(overrides))
    if key not in _refs:
        _refs[key] = ReferenceModel(model, kv_cache_dtype=fmt, kv_rounding=rounding, overrides=overrides)
    return _refs[key]


def _agreement(results, ref, prompts, chunk_sizes=None, **generate_kw):
    """(share of generated positions before each stream's first token that differs from the reference's, median
    and max |dlogprob| over those positions)."""
    import statistics

    diffs, total = [], 0
    for k, ((toks, lps, _), p) in enumerate(zip(results, prompts)):
        rtoks, rlps = ref.generate(p, len(toks), chunk_sizes=chunk_sizes[k] if chunk_sizes else None, **generate_kw)
        total += len(toks)
        for a, b, x, y in zip(toks, rtoks, lps, rlps):
            if a != b:
                break
            diffs.append(abs(x - y))
    if not diffs:
        return 0.0, math.inf, math.inf
    return len(diffs) / total, statistics.median(diffs), max(diffs)


def _assert_matches(results, ref, prompts, **kw):
    share, median, worst = _agreement(results, ref, prompts, **kw)
    print(f"  agreement {share:.2f}, median |dlogprob| {median:.1e}, max {worst:.1e}")
    assert share >= MIN_AGREEMENT and median < MEDIAN_DLOGPROB and worst < MAX_DLOGPROB, (share, median, worst)


def _assert_differs(results, ref, prompts, **kw):
    share, median, _ = _agreement(results, ref, prompts, **kw)
    assert share < MIN_AGREEMENT or median > MIN_FP8_EFFECT, (share, median)


def _prompts(model):
    return [p[:n] for p, n in zip(text_prompts(model, len(LENGTHS), max(LENGTHS)), LENGTHS)]


def test_page_dtype_agrees_with_the_reference_tables():
    """Two independent implementations of the formats: the engine's (cast, then step toward zero) and the
    reference's (value tables), on normal, subnormal, saturating and tiny values, both roundings, with scales."""
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4000, generator=g) * 3, torch.randn(1000, generator=g) * 1e-3,
                   torch.tensor([1e6, -1e6, 448.0, 449.0, 57344.0, 6e4, 0.0, -0.0, 1e-12, 0.1])])
    for fmt in ("fp8", "fp8_e4m3", "fp8_e5m2"):
        for rounding in ("nearest", "toward_zero"):
            for scale in (1.0, 0.37, 4.0):
                pd = PageDtype(fmt, rounding)
                got = pd.round_trip(x.double(), scale)
                want = fp8_round_trip(x.double(), fmt, rounding, scale)
                assert torch.equal(got, want), (fmt, rounding, scale, (got != want).sum())
    # saturation, not inf/NaN; toward zero never increases a magnitude
    assert PageDtype("fp8").round_trip(torch.tensor([1e6]), 1.0).item() == 448.0
    y = torch.randn(1000, generator=g)
    assert bool((PageDtype("fp8_e5m2", "toward_zero").round_trip(y, 1.0).abs() <= y.abs()).all())


def test_cpu_path_declares_the_rounding_of_vllms_cpu_kernels():
    """The cpu path stores through vLLM's CPU kernels; what they store must be what `PageDtype(rounding=
    'toward_zero')` says (V byte for byte; K, stored transposed in a private order, as a multiset per block)."""
    from lckv_vllm.engine.attention import cpu_kernels as ck
    from lckv_vllm.engine.attention.cpu_path import CpuPath, unsupported_reason

    assert CpuPath(PageDtype("fp8")).page_dtype.rounding == "toward_zero"
    reason = unsupported_reason(64, torch.float32, 32, PageDtype("fp8"))
    if reason is not None:  # no AVX-512/AMX: the chooser must name it (auto then serves fp8 pages on the torch path)
        assert "fp8 pages on this CPU" in reason
        return
    g = torch.Generator().manual_seed(1)
    for fmt in ("fp8", "fp8_e5m2"):
        hk, bs, d = 2, 32, 64
        cache = torch.zeros(1, hk, bs, 2 * d, dtype=torch.uint8)
        kc, vc = cache.view(1, hk, bs * 2, d).chunk(2, dim=2)
        k, v = torch.randn(bs, hk, d, generator=g) * 3, torch.randn(bs, hk, d, generator=g) * 3
        v[0, 0, :4] = torch.tensor([1e6, -1e6, 1e-9, 0.1])
        isa = ck.attention_isa(torch.float32, bs, d, fmt)
        ck.write_kv(k, v, kc, vc, torch.arange(bs), isa, 0.7, 0.5, kv_cache_dtype=fmt)
        pd = PageDtype(fmt, "toward_zero")
        assert torch.equal(vc.reshape(hk, bs, d), pd.store(v, 0.5).transpose(0, 1))
        assert torch.equal(kc.reshape(hk, -1).sort(-1).values,
                           pd.store(k, 0.7).transpose(0, 1).reshape(hk, -1).sort(-1).values)
        # and it is not what rounding to nearest stores
        assert not torch.equal(vc.reshape(hk, bs, d), PageDtype(fmt).store(v, 0.5).transpose(0, 1))


# deploy-time overrides of the trained examples: the plan kinds of the feature matrix
CLA2 = {"layer_types": "0_0_2_2_4_4"}  # acyclic
YOCO = {"layer_types": "0s_1s_2s_2_2_2", "sliding_window": 8}  # windowed pages (layers 0 and 1) next to full ones
STREAMING = {"lckv_streaming": {"sink_tokens": 4, "window": 24}}
CASES = [  # (model, engine's attention path, kv dtype, deploy-time overrides, case name)
    (TRAINED_W2, "torch", "fp8", None, "w2-torch-e4m3"),
    (TRAINED_W2, "auto", "fp8_e4m3", None, "w2-cpu-e4m3"),
    (TRAINED_W2, "torch", "fp8_e5m2", None, "w2-torch-e5m2"),
    (IDENTITY, "auto", "fp8", None, "identity-cpu-e4m3"),
    (IDENTITY, "torch", "fp8", CLA2, "cla2-torch-e4m3"),
    (IDENTITY, "auto", "fp8_e5m2", YOCO, "yoco-windowed-cpu-e5m2"),
    (TRAINED_W2, "auto", "fp8", STREAMING, "w2-streaming-torch-e4m3"),
    (TRAINED_W2, "triton", "fp8_e5m2", None, "w2-triton-e5m2"),  # the kernels, under Triton's interpreter here
]


@pytest.mark.parametrize("model,impl,fmt,overrides", [c[:4] for c in CASES], ids=[c[4] for c in CASES])
def test_engine_equals_the_fp8_reference(engine, model, impl, fmt, overrides):
    kw = dict(kv_cache_dtype=fmt, block_size=32)
    if overrides:
        kw["hf_overrides"] = overrides
    env = None if impl == "auto" else {"LCKV_ATTENTION_IMPL": impl}
    llm = engine(str(model), env=env, **kw)
    path = model_of(llm).model.path
    assert path.page_dtype.name == fmt
    rounding = ROUNDING[path.name]
    prompts = _prompts(model)
    if path.name == "triton":
        prompts = prompts[1::2]  # the interpreter is slow: 5, 30 tokens
    results = generate(llm, prompts)
    print(f"{model.name} {path.name} {fmt} {overrides}:")
    _assert_matches(results, _reference(model, fmt, rounding, overrides), prompts)
    # the comparison can tell: unquantized pages, or the other rounding, are far from what the engine served
    other = "toward_zero" if rounding == "nearest" else "nearest"
    for ref in (_reference(model, "auto", "nearest", overrides), _reference(model, fmt, other, overrides)):
        _assert_differs(results, ref, prompts)


def test_scales_come_from_the_checkpoint_and_consumers_read_with_their_producers(engine, tmp_path):
    """k_scale / v_scale tensors in the checkpoint (vLLM's names) scale the producers' pages; every consumer of
    layer 4 reads with layer 4's.  A consumer's scales are ignored (it owns no pages)."""
    from safetensors.torch import load_file, save_file

    model = tmp_path / "w2-scaled"
    shutil.copytree(TRAINED_W2, model)
    sd = load_file(str(model / "model.safetensors"))
    # 3 x powers of two: exact in the float32 tensors, and not powers of two themselves (fp8 values scaled by a power
    # of two are fp8 values again, so such scales change little); saturation at 448 * scale
    scales = {0: (0.09375, 0.046875), 4: (0.046875, 0.0234375), 5: (0.75, 0.375)}
    for layer, (ks, vs) in scales.items():
        sd[f"model.layers.{layer}.self_attn.k_scale"] = torch.tensor(ks)
        sd[f"model.layers.{layer}.self_attn.attn.v_scale"] = torch.tensor(vs)
    sd["model.layers.2.self_attn.kv_scale"] = torch.tensor(123.0)  # a consumer: dropped
    save_file(sd, str(model / "model.safetensors"))
    llm = engine(str(model), env={"LCKV_ATTENTION_IMPL": "torch"}, kv_cache_dtype="fp8", block_size=32)
    layers = model_of(llm).model.layers
    assert {i: layers[i].self_attn.attn.impl.kv_scales for i in scales} == scales
    ref = _reference(model, "fp8", "nearest")
    assert ref.kv_scales == {**{i: list(s) for i, s in scales.items()}, 2: [123.0, 123.0]}
    prompts = _prompts(model)
    results = generate(llm, prompts)
    _assert_matches(results, ref, prompts)
    _assert_differs(results, _reference(TRAINED_W2, "fp8", "nearest"), prompts)  # same weights, scales 1.0


def test_per_head_scales_are_refused_at_load(tmp_path):
    from safetensors.torch import load_file, save_file
    from vllm import LLM

    model = tmp_path / "w2-per-head"
    shutil.copytree(TRAINED_W2, model)
    sd = load_file(str(model / "model.safetensors"))
    sd["model.layers.4.self_attn.k_scale"] = torch.tensor([0.1, 0.2])
    save_file(sd, str(model / "model.safetensors"))
    with pytest.raises(Exception, match=r"model\.layers\.4\.self_attn\.k_scale: 2 values"):
        LLM(str(model), dtype="float32", kv_cache_dtype="fp8", kv_cache_memory_bytes=16 << 20, max_model_len=256,
            block_size=32, enforce_eager=True)


def _kv_tokens(llm) -> int:
    cfg = llm.llm_engine.vllm_config.cache_config
    return cfg.num_gpu_blocks * cfg.block_size


@pytest.mark.parametrize("model", [TRAINED_W2, IDENTITY], ids=["w2", "identity"])
def test_fp8_pages_hold_four_times_the_tokens_of_float32_pages(engine, model):
    budget = 32 << 20
    full = engine(str(model), kv_cache_memory_bytes=budget, block_size=32)
    fp8 = engine(str(model), kv_cache_memory_bytes=budget, block_size=32, kv_cache_dtype="fp8")
    ratio = _kv_tokens(fp8) / _kv_tokens(full)
    print(f"{model.name}: {_kv_tokens(full)} float32 tokens, {_kv_tokens(fp8)} fp8 tokens: x{ratio:.3f}")
    assert ratio >= 0.99 * 4, ratio


def test_metrics_and_plan_count_one_byte_per_element(engine):
    """lckv-serve's /metrics KV gauges and `lckv-vllm plan --dtype fp8` count fp8 pages at one byte per element."""
    import subprocess
    import sys

    from lckv_vllm.server.metrics import KVLayout

    llm = engine(str(TRAINED_W2), kv_cache_memory_bytes=32 << 20, block_size=32, kv_cache_dtype="fp8")
    layout = KVLayout.from_vllm_config(llm.llm_engine.vllm_config)
    assert layout.bytes_per_token == 3 * 2 * 2 * 32  # 3 producers x K,V x 2 KV heads x head dim 32 x 1 byte
    assert layout.full_bytes_per_token == 6 * 2 * 2 * 32
    out = subprocess.run([sys.executable, "-m", "lckv_vllm.cli", "plan", str(TRAINED_W2), "--dtype", "fp8"],
                         capture_output=True, text=True, check=True).stdout
    assert "KV bytes per token (2 KV heads x 32 x 1 B): 384 vs 768 for all layers" in out


def test_prefix_cache_hit_reads_the_stored_fp8_pages(engine):
    """A prompt sharing 70 tokens with an earlier one reads the cached fp8 blocks as stored and encodes the rest on
    top: the fp8 reference split at the hit."""
    llm = engine(str(TRAINED_W2), env={"LCKV_ATTENTION_IMPL": "torch"}, kv_cache_dtype="fp8", block_size=32,
                 max_num_seqs=8)
    first, other = text_prompts(TRAINED_W2, 2, 100)
    second = first[:70] + other[:30]
    generate(llm, [first], max_tokens=2)
    toks, lps, hit = generate(llm, [second])[0]
    assert hit == 64  # the two full 32-token blocks of the shared 70 tokens
    _assert_matches([(toks, lps, hit)], _reference(TRAINED_W2, "fp8", "nearest"), [second],
                    chunk_sizes=[[hit, len(second) - hit]])


def test_recompute_after_preemption_with_fp8_pages_is_exact(engine):
    """A KV cache of 256 fp8 tokens for 8 requests that need 512: vLLM preempts, the plugin re-encodes prompt +
    generated tokens exactly (whole-prompt mode, tolerance 0), into fp8 pages again: the fp8 reference that never
    preempts, token for token."""
    n_req, gen = 8, 40
    env = {"LCKV_ATTENTION_IMPL": "torch", "LCKV_CHUNKED_PREFILL": "0", "LCKV_PREFILL_TOL": "0"}
    ref = _reference(TRAINED_W2, "fp8", "nearest")
    kv_bytes = ref.plan.kv_bytes_per_token(ref.nkv, ref.hd, 1) * 256
    llm = engine(str(TRAINED_W2), env=env, kv_cache_dtype="fp8", block_size=32, kv_cache_memory_bytes=kv_bytes,
                 max_num_seqs=n_req, max_model_len=128, disable_log_stats=False)
    count = lambda: sum(int(getattr(m, "value", 0)) for m in llm.get_metrics() if m.name == "vllm:num_preemptions")  # noqa
    before = count()
    prompts = text_prompts(TRAINED_W2, n_req, 24)
    results = generate(llm, prompts, max_tokens=gen)
    assert count() > before
    _assert_matches(results, ref, prompts, tol=0)
