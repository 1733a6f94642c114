"""The Triton attention path (`LCKV_ATTENTION_IMPL=triton`) against the torch path.

On this CPU-only project the kernels run under Triton's interpreter (slow), so the cases are small: one check of the
path objects on a hand-made step, and one short greedy generation of the w2 model with both paths built in the same
process (which is also the check that each engine keeps the implementation it was built with).
"""

from __future__ import annotations

import pytest
import torch

from conftest import generate, model_of, random_prompt
from lckv_vllm.engine.attention.chooser import make_path
from lckv_vllm.engine.attention.page_dtype import PageDtype
from lckv_vllm.engine.attention.step import make_step
from lckv_vllm.settings import ATTENTION_IMPL_ENV


@pytest.mark.parametrize("page_dtype", ["auto", "fp8_e4m3", "fp8_e5m2"])
def test_triton_path_matches_torch_path(page_dtype):
    """write_kv / zero_slots / attend of the Triton path on vLLM's 4-D page tensor equal the torch path's (fp8
    pages: the same bytes, both round to nearest even; read with the same scales)."""
    g = torch.Generator().manual_seed(0)
    num_blocks, block_size, hk, hq, d = 6, 4, 2, 4, 32
    ctx_q = [(0, 3), (5, 1), (2, 6)]
    perm = torch.randperm(num_blocks, generator=g)
    bt = torch.stack([perm[0:2], perm[2:4], perm[4:6]]).to(torch.int32)
    q_lens = torch.tensor([q for _, q in ctx_q])
    qsl = torch.cat([torch.zeros(1, dtype=torch.long), q_lens.cumsum(0)]).to(torch.int32)
    seq_lens = torch.tensor([c + q for c, q in ctx_q], dtype=torch.int32)
    slot_mapping = torch.cat([bt[s, p // block_size].long() * block_size + p % block_size
                              for s, (c, q) in enumerate(ctx_q) for p in [torch.arange(c, c + q)]])
    slot_mapping[1] = -1  # a padding token: skipped by the writes
    first4 = make_step(num_reqs=1, num_actual_tokens=4, query_start_loc=torch.tensor([0, 4], dtype=torch.int32),
                       seq_lens=torch.tensor([4], dtype=torch.int32), block_table=bt, slot_mapping=slot_mapping[:4],
                       query_start_loc_cpu=None, seq_lens_cpu=None)  # only its slot_mapping matters to zero_slots
    md = make_step(num_reqs=3, num_actual_tokens=10, query_start_loc=qsl, seq_lens=seq_lens, block_table=bt,
                   slot_mapping=slot_mapping, query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)
    # vLLM's logical [num_blocks, num_kv_heads, block_size, 2d] view of token-major (LBNHC) pages
    phys = torch.randn(num_blocks, block_size, hk, 2 * d, generator=g)
    pd = PageDtype(page_dtype)
    scales = (0.37, 1.9) if pd.quantized else (1.0, 1.0)
    if pd.quantized:  # vLLM allocates fp8 pages as uint8
        phys = torch.cat([pd.store(phys[..., :d], scales[0]), pd.store(phys[..., d:], scales[1])], -1)
    caches = {name: phys.clone().transpose(1, 2) for name in ("torch", "triton")}
    k, v = torch.randn(2, 10, hk, d, generator=g)
    q = torch.randn(10, hq, d, generator=g)
    out = {}
    for name, cache in caches.items():
        path = make_path(name, pd)
        path.zero_slots(cache, first4)
        path.write_kv(k[4:], v[4:], cache, slot_mapping[4:], md, scales=scales)
        out[name] = path.attend(q, cache, md, scale=d**-0.5, strict=True, window=5, out=torch.empty_like(q),
                                scales=scales)
    assert torch.equal(caches["torch"], caches["triton"])
    torch.testing.assert_close(out["triton"], out["torch"], atol=1e-5, rtol=0)


def test_triton_greedy_generation_equals_torch(engine):
    """tiny-w2 (cyclic plan: iterative prefill, strict reads of the top layer's pages), greedy, token for token."""
    prompts = [random_prompt(n, seed=50 + n) for n in (1, 6, 13)]
    torch_llm = engine("tiny-w2", env={ATTENTION_IMPL_ENV: "torch"})
    triton_llm = engine("tiny-w2", env={ATTENTION_IMPL_ENV: "triton"})
    # The choice was captured when each engine was built; the environment is restored by now.
    assert {a.self_attn.path.name for a in model_of(torch_llm).model.layers} == {"torch"}
    assert {a.self_attn.path.name for a in model_of(triton_llm).model.layers} == {"triton"}
    ref = generate(torch_llm, prompts, max_tokens=8)
    got = generate(triton_llm, prompts, max_tokens=8)
    for (toks, lps, _), (rtoks, rlps, _) in zip(got, ref):
        assert toks == rtoks
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3


def test_triton_streaming_generation_equals_torch(engine, tmp_path):
    """StreamingLLM mode on the Triton path (the kernel's sink + window ranges, keys rotated in the kernel) against
    the torch path's streaming reads: tiny-w2, 3 sinks + a window of 8, prompts and generations past both."""
    import json

    from lckv_vllm.tools.checkpoint import make_preset

    path = make_preset("tiny-w2", tmp_path / "w2-stream")
    cfg = json.loads((path / "config.json").read_text())
    cfg["lckv_streaming"] = {"sink_tokens": 3, "window": 8}
    (path / "config.json").write_text(json.dumps(cfg))
    prompts = [random_prompt(n, seed=60 + n) for n in (2, 14)]
    torch_llm = engine(str(path), env={ATTENTION_IMPL_ENV: "torch"})
    triton_llm = engine(str(path), env={ATTENTION_IMPL_ENV: "triton"})
    assert model_of(triton_llm).model.path.name == "triton"  # streaming reads go through TritonPath.attend_streaming
    ref = generate(torch_llm, prompts, max_tokens=12)
    got = generate(triton_llm, prompts, max_tokens=12)
    for (toks, lps, _), (rtoks, rlps, _) in zip(got, ref):
        assert toks == rtoks
        assert max(abs(a - b) for a, b in zip(lps, rlps)) < 1e-3
