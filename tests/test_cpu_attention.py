"""The `cpu` attention path (vLLM's C++ kernels made strict, lckv_vllm/engine/attention/cpu_path.py) against the float64
reference of the semantics (kernels/torch_reference.py), which shares no code with it.

Every case writes K/V through the path's own write op (the pages are in the kernels' private format), poisons the
output with NaN, and checks every row: strict and inclusive masks, sliding windows (a strict window of 1 shows no
key at all), GQA, the block sizes the two kernel variants serve (16: vec16, 32/128: vec), queries at position 0
and one-token prompts, chunks with context, decodes; plus the zero-fill of a step's slots.
"""

import math
import os

import pytest
import torch

from lckv_vllm.engine.attention import cpu_path as cpu
from lckv_vllm.engine.attention.step import make_step
from lckv_vllm.kernels.torch_reference import paged_attention_ref, write_kv_ref

pytestmark = pytest.mark.skipif(cpu.unsupported_reason(32) is not None, reason="needs vLLM's CPU build")
PATH = cpu.CpuPath()

FUZZ_CASES = int(os.environ.get("LCKV_FUZZ_CASES", "12"))  # 300 ran clean once by hand; CI runs 12

# (context, query length) per sequence: prompts from position 0 (incl. one token), chunks after context, decodes
BATCH = [(0, 1), (5, 1), (0, 7), (40, 3), (0, 70), (130, 1), (3, 40), (17, 16)]


class Pages:
    def __init__(self, ctx_q, hk, d, bs, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ctx_q, self.bs = ctx_q, bs
        nblk = [math.ceil((c + q) / bs) for c, q in ctx_q]
        nb = sum(nblk) + 3
        perm = torch.randperm(nb, generator=g)
        self.block_table = torch.zeros(len(ctx_q), max(nblk), dtype=torch.int32)
        used = 0
        for s, n in enumerate(nblk):
            self.block_table[s, :n] = perm[used:used + n]
            used += n
        self.kv_cache = torch.zeros(nb, hk, bs, 2 * d)  # the logical shape vLLM hands a layer, LBHNC in memory
        self.ref_slots = torch.zeros(nb * bs, hk, 2 * d, dtype=torch.float64)
        self.seq_lens = torch.tensor([c + q for c, q in ctx_q], dtype=torch.int32)
        self.slots = torch.cat([self.slot_of(s, torch.arange(int(n))) for s, n in enumerate(self.seq_lens)])
        n = int(self.seq_lens.sum())
        k, v = torch.randn(n, hk, d, generator=g), torch.randn(n, hk, d, generator=g)
        PATH.write_kv(k, v, self.kv_cache, self.slots)
        write_kv_ref(k.double(), v.double(), self.ref_slots, self.slots)
        qsl = torch.zeros(len(ctx_q) + 1, dtype=torch.int32)
        qsl[1:] = torch.tensor([q for _, q in ctx_q]).cumsum(0)
        self.query_start_loc = qsl

    def slot_of(self, s, positions):
        return self.block_table[s, positions // self.bs].long() * self.bs + positions % self.bs

    def metadata(self):
        step_slots = torch.cat([self.slot_of(s, torch.arange(c, c + q)) for s, (c, q) in enumerate(self.ctx_q)])
        return make_step(
            num_actual_tokens=int(self.query_start_loc[-1]), num_reqs=len(self.ctx_q),
            query_start_loc=self.query_start_loc, seq_lens=self.seq_lens, block_table=self.block_table,
            slot_mapping=step_slots, query_start_loc_cpu=self.query_start_loc, seq_lens_cpu=self.seq_lens)


@pytest.mark.parametrize("bs", [16, 32, 128])
@pytest.mark.parametrize("hq,hk,d", [(4, 2, 32), (8, 8, 32), (6, 2, 64), (8, 1, 128)])
@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("window", [None, 1, 4, 17])
def test_attend_matches_reference(bs, hq, hk, d, strict, window):
    pages = Pages(BATCH, hk, d, bs)
    md = pages.metadata()
    q = torch.randn(md.num_actual_tokens, hq, d, generator=torch.Generator().manual_seed(1))
    out = torch.full_like(q, float("nan"))
    got = PATH.attend(q, pages.kv_cache, md, scale=d ** -0.5, strict=strict, window=window, out=out)
    assert got.data_ptr() == out.data_ptr()
    want = paged_attention_ref(q.double(), pages.ref_slots, pages.query_start_loc, pages.seq_lens,
                               pages.block_table, bs, d ** -0.5, strict, window)
    assert not torch.isnan(out).any()
    assert (out.double() - want).abs().max().item() < 2e-5
    if strict:  # rows at position 0 see no key: exactly 0
        for s, (c, _) in enumerate(BATCH):
            if c == 0:
                assert torch.equal(out[int(pages.query_start_loc[s])], torch.zeros(hq, d))


def test_scheduler_metadata_is_built_once_per_step_and_mask():
    pages = Pages(BATCH, 2, 32, 16)
    md = pages.metadata()
    q = torch.randn(md.num_actual_tokens, 4, 32)
    for _ in range(3):
        for strict in (True, False):
            PATH.attend(q, pages.kv_cache, md, scale=0.1, strict=strict, window=None, out=torch.empty_like(q))
    assert len(md.cpu_state.scheduler) == 2


def test_zero_slots_then_attend_sees_zeros():
    """After zero-filling this step's slots, a strict query sees exactly the context's K/V plus zero K/V for the
    step's earlier tokens (the first pass of an iterative prefill)."""
    pages = Pages(BATCH, 2, 32, 32)
    md = pages.metadata()
    PATH.zero_slots(pages.kv_cache, md)
    pages.ref_slots[md.slot_mapping] = 0
    q = torch.randn(md.num_actual_tokens, 4, 32)
    out = PATH.attend(q, pages.kv_cache, md, scale=32 ** -0.5, strict=True, window=None, out=torch.empty_like(q))
    want = paged_attention_ref(q.double(), pages.ref_slots, pages.query_start_loc, pages.seq_lens,
                               pages.block_table, 32, 32 ** -0.5, True, None)
    assert (out.double() - want).abs().max().item() < 2e-5


def test_unsupported_shapes_are_named():
    assert "head size 16" in cpu.unsupported_reason(16)
    assert cpu.unsupported_reason(64, torch.float64) == "dtype torch.float64"


@pytest.mark.parametrize("seed", range(FUZZ_CASES))
def test_random_batches_match_reference(seed):
    """Seeded random batches: sequence count, context and query lengths, GQA shape, block size, mask and window."""
    import random

    rnd = random.Random(seed)
    batch = [(rnd.choice([0, 0, rnd.randrange(1, 300)]), rnd.choice([1, 1, rnd.randrange(1, 90)]))
             for _ in range(rnd.randrange(1, 12))]
    hk = rnd.choice([1, 2, 4])
    hq, d = hk * rnd.choice([1, 2, 3, 8]), rnd.choice([32, 64, 128])
    bs, strict, window = rnd.choice([16, 32, 128]), rnd.random() < 0.7, rnd.choice([None, None, 2, 9, 64])
    pages = Pages(batch, hk, d, bs, seed=seed)
    md = pages.metadata()
    q = torch.randn(md.num_actual_tokens, hq, d, generator=torch.Generator().manual_seed(seed))
    out = torch.full_like(q, float("nan"))
    PATH.attend(q, pages.kv_cache, md, scale=d ** -0.5, strict=strict, window=window, out=out)
    want = paged_attention_ref(q.double(), pages.ref_slots, pages.query_start_loc, pages.seq_lens,
                               pages.block_table, bs, d ** -0.5, strict, window)
    assert (out.double() - want).abs().max().item() < 2e-5, (batch, hq, hk, d, bs, strict, window)


def test_write_skips_padding_slots():
    pages = Pages([(0, 4)], 2, 32, 16)
    before = pages.kv_cache.clone()
    k = torch.randn(3, 2, 32)
    slots = torch.tensor([5, -1, 7])
    PATH.write_kv(k, k, pages.kv_cache, slots)
    changed = (pages.kv_cache != before).any(-1).any(1).nonzero()  # (block, offset-ish) rows touched
    assert changed.numel() > 0
    # writing the -1 row elsewhere would change a third slot: rewrite slots 5 and 7 with the old values and compare
    PATH.write_kv(torch.zeros(2, 2, 32), torch.zeros(2, 2, 32), before, torch.tensor([5, 7]))
    PATH.write_kv(torch.zeros(2, 2, 32), torch.zeros(2, 2, 32), pages.kv_cache, torch.tensor([5, 7]))
    assert torch.equal(before, pages.kv_cache)


def test_auto_falls_back_and_forced_path_refuses_unsupported_shapes(monkeypatch):
    from lckv_vllm.engine.attention.chooser import select_path
    from lckv_vllm.settings import ATTENTION_IMPL_ENV, load_settings

    def chosen(*args, **kw):
        return select_path(load_settings(), "cpu", *args, **kw).name

    monkeypatch.setenv(ATTENTION_IMPL_ENV, "auto")
    assert chosen(32, 2, torch.float32) == "cpu"
    assert chosen(16, 2, torch.float32) == "torch"  # auto falls back for shapes vLLM lacks
    assert chosen(32, 2, torch.float32, block_size=8) == "torch"  # the kernels need 16 | size
    monkeypatch.setenv(ATTENTION_IMPL_ENV, "cpu")
    with pytest.raises(ValueError, match="head size 16"):
        chosen(16, 2, torch.float32)
    with pytest.raises(ValueError, match="block size 24"):
        chosen(32, 2, torch.float32, block_size=24)
    monkeypatch.setenv(ATTENTION_IMPL_ENV, "torch")
    assert chosen(32, 2, torch.float32) == "torch"
    monkeypatch.setenv(ATTENTION_IMPL_ENV, "fast")
    with pytest.raises(ValueError, match="expected one of auto, cpu, torch, triton"):
        chosen(32, 2, torch.float32)
