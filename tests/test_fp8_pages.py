"""fp8 KV pages (`--kv-cache-dtype fp8` / `fp8_e4m3` / `fp8_e5m2`): the page stores fp8(x / scale), every read sees
fp8 * scale (docs/semantics.md, "fp8 pages").

Oracles: the float64 reference with the same quantization (`ReferenceModel(kv_cache_dtype=..., kv_rounding=...)`,
written from the formats' value tables, not with the engine's code), on the trained examples (their iterative
prefill converges, so the comparison is not drowned by a random model's chaos): greedy tokens equal and |dlogprob|
< 1e-4, where the unquantized reference and the reference with the other rounding are > 1e-2 away (so the test sees
a path that ignored the page dtype, the scales or the rounding).  The rounding each path declares is checked against
vLLM's CPU kernels byte for byte.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import TRAINED_W2, ROOT, generate, model_of, text_prompts
from lckv_vllm.engine.attention.page_dtype import PageDtype
from lckv_vllm.reference import ReferenceModel, fp8_round_trip

IDENTITY = ROOT / "examples" / "shakespeare-identity"
LENGTHS = (1, 5, 9, 30, 70)  # m+b = 9 for w2
MAX_DLOGPROB = 1e-4  # measured: <= 5e-6 on these cases
MIN_FP8_EFFECT = 1e-2  # measured: 0.14-0.2 between fp8 and unquantized, or between the two roundings
ROUNDING = {"torch": "nearest", "triton": "nearest", "cpu": "toward_zero"}
_refs: dict = {}


def _reference(model, fmt, rounding, overrides=None):
    key = (str(model), fmt, rounding, repr(overrides))
    if key not in _refs:
        _refs[key] = ReferenceModel(model, kv_cache_dtype=fmt, kv_rounding=rounding, overrides=overrides)
    return _refs[key]


def _distance(results, ref, prompts):
    """(prompts whose greedy tokens equal the reference's, max |dlogprob| over the common prefix)."""
    same, worst = 0, 0.0
    for (toks, lps, _), p in zip(results, prompts):
        rtoks, rlps = ref.generate(p, 16)
        same += toks == rtoks
        for a, b, x, y in zip(toks, rtoks, lps, rlps):
            if a != b:
                break
            worst = max(worst, abs(x - y))
    return same, worst


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
    same, worst = _distance(results, _reference(model, fmt, rounding, overrides), prompts)
    print(f"{model.name} {path.name} {fmt} {overrides}: max |dlogprob| {worst:.2e}")
    assert same == len(prompts) and worst < MAX_DLOGPROB, (same, worst)
    # the comparison can tell: unquantized pages, or the other rounding, are far from what the engine served
    other = "toward_zero" if rounding == "nearest" else "nearest"
    for ref in (_reference(model, "auto", "nearest", overrides), _reference(model, fmt, other, overrides)):
        same, worst = _distance(results, ref, prompts)
        assert same < len(prompts) or worst > MIN_FP8_EFFECT, (same, worst)


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
    same, worst = _distance(results, ref, prompts)
    assert same == len(prompts) and worst < MAX_DLOGPROB, (same, worst)
    unit = _reference(TRAINED_W2, "fp8", "nearest")  # same weights, scales 1.0
    same, worst = _distance(results, unit, prompts)
    assert same < len(prompts) or worst > MIN_FP8_EFFECT, (same, worst)


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
