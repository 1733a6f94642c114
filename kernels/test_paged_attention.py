"""The unified paged-attention kernel against the float64 reference (`reference.paged_attention_ref`).

Every case draws fresh random inputs, scatters each sequence over a shuffled set of pages, poisons everything the
kernel must not read (unused pages, the tail of a partial last page, block-table padding) and the output with NaN,
and checks the error against the reference with a bound per dtype.  Rows that see no key must be exactly 0.
Shapes are small on purpose: on CPU the kernels run under Triton's interpreter.
"""

from __future__ import annotations

import math

import pytest
import torch

from lckv_vllm.kernels.paged_attention import paged_attention
from lckv_vllm.kernels.torch_reference import fp8_bits_ref, paged_attention_ref, streaming_attention_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max |kernel - float64 reference| on outputs of magnitude ~1.  fp32: exact-ish (fp32 accumulation, IEEE dots);
# fp16/bf16: dominated by rounding P to the input dtype before P @ V and by rounding the output itself.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# (context tokens already in the cache, query tokens this step) per sequence.  Covers: a sequence of length 1,
# prefill from position 0, chunked prefill on top of a context, decode, a prefill ending exactly on a page
# boundary, sequences longer than one key tile.
MIXED = [(0, 1), (0, 7), (13, 5), (30, 1), (16, 16), (0, 19), (41, 3)]
DECODE = [(0, 1), (5, 1), (63, 1), (100, 1), (37, 1)]

measured: dict = {}  # dtype -> worst error seen over this module


@pytest.fixture(scope="module", autouse=True)
def report_errors():
    """Print the worst error per dtype once the module is done (visible with `pytest -s`)."""
    yield
    for dtype, err in sorted(measured.items(), key=str):
        print(f"\npaged_attention max |err| vs float64 reference, {dtype}: {err:.3g}")


def make_batch(ctx_q, num_kv_heads, group, head_size, dtype, block_size, seed):
    """Random queries and pages for `ctx_q`; everything the kernel must not read is NaN."""
    g = torch.Generator().manual_seed(seed)
    num_heads = num_kv_heads * group
    blocks_per_seq = [math.ceil((c + q) / block_size) for c, q in ctx_q]
    num_blocks = sum(blocks_per_seq) + 3  # spare pages that no sequence owns
    perm = torch.randperm(num_blocks, generator=g)  # shuffled, non-contiguous pages
    width = max(blocks_per_seq) + 2
    spare = perm[-1].item()
    block_table = torch.full((len(ctx_q), width), spare, dtype=torch.int32)  # padding points at a NaN page
    used = 0
    for s, n in enumerate(blocks_per_seq):
        block_table[s, :n] = perm[used:used + n]
        used += n
    kv = torch.randn(num_blocks * block_size, num_kv_heads, 2 * head_size, generator=g)
    valid = torch.zeros(num_blocks * block_size, dtype=torch.bool)
    for s, (c, q) in enumerate(ctx_q):
        p = torch.arange(c + q)
        valid[block_table[s, p // block_size].long() * block_size + p % block_size] = True
    kv[~valid] = float("nan")  # spare pages and the tails of partial last pages
    kv = kv.to(dtype)
    q_lens = torch.tensor([q for _, q in ctx_q])
    query_start_loc = torch.zeros(len(ctx_q) + 1, dtype=torch.int32)
    query_start_loc[1:] = q_lens.cumsum(0)
    seq_lens = torch.tensor([c + q for c, q in ctx_q], dtype=torch.int32)
    num_tokens = int(query_start_loc[-1])
    # Queries as the model passes them: a view into a fused projection output, rows not contiguous.
    fused = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=g).to(dtype)
    q = fused[:, :num_heads * head_size].view(num_tokens, num_heads, head_size)
    return q, kv, query_start_loc, seq_lens, block_table


def no_key_rows(ctx_q, strict, window):
    """Token indices whose query sees no key: position 0 under strict, and window 1 under strict."""
    rows, t0 = [], 0
    for c, q in ctx_q:
        for i in range(q):
            pos = c + i
            first = 0 if window is None else max(0, pos - window + 1)
            last = pos - 1 if strict else pos
            if last < first:
                rows.append(t0 + i)
        t0 += q
    return rows


def to_fp8_pages(kv: torch.Tensor, fp8: str | None, scales) -> torch.Tensor:
    """Float pages -> uint8 pages of `fp8` (K half with scales[0], V half with scales[1]); NaN poison stays NaN."""
    if fp8 is None:
        return kv
    d = kv.shape[-1] // 2
    return torch.cat([fp8_bits_ref(kv[..., :d], fp8, scales[0]), fp8_bits_ref(kv[..., d:], fp8, scales[1])], -1)


def check(ctx_q, *, num_kv_heads=2, group=1, head_size=32, dtype=torch.float32, block_size=8, strict=False,
          window=None, num_splits=1, block_n=16, seed=0, fp8=None, scales=(1.0, 1.0)):
    q, kv, qsl, seq_lens, bt = make_batch(ctx_q, num_kv_heads, group, head_size, dtype, block_size, seed)
    kv = to_fp8_pages(kv, fp8, scales)
    scale = head_size ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)  # poisoned: every row must be written
    on = lambda x: x.to(DEVICE)  # noqa: E731
    got = paged_attention(
        on(q), on(kv), query_start_loc=on(qsl), seq_lens=on(seq_lens), block_table=on(bt), block_size=block_size,
        scale=scale, strict=strict, window=window, max_query_len=max(n for _, n in ctx_q),
        max_seq_len=int(seq_lens.max()), out=out, num_splits=num_splits, block_n=block_n, fp8=fp8, scales=scales,
    )
    assert got is out
    ref = paged_attention_ref(q, kv, qsl, seq_lens, bt, block_size, scale, strict, window, fp8=fp8, scales=scales)
    got = got.cpu().to(torch.float64)
    assert not got.isnan().any(), "NaN in the output: a row was not written or a poisoned slot was read"
    err = (got - ref).abs().max().item()
    measured[dtype] = max(measured.get(dtype, 0.0), err)
    assert err <= TOLERANCE[dtype], f"max |err| {err:.3g} > {TOLERANCE[dtype]:.1g} ({dtype})"
    zero = no_key_rows(ctx_q, strict, window)
    if zero:
        assert (got[zero] == 0).all(), "a query with no visible key must output exactly 0"
    return err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("head_size", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
def test_mixed_batch_dtypes_and_head_sizes(dtype, head_size, strict):
    check(MIXED, num_kv_heads=1, group=3, head_size=head_size, dtype=dtype, strict=strict,
          seed=head_size + strict)


@pytest.mark.parametrize("group", [1, 3, 8])
@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("window", [None, 1, 5], ids=["full", "w1", "w5"])
def test_gqa_strict_window(group, strict, window):
    check(MIXED, num_kv_heads=2, group=group, strict=strict, window=window, seed=10 * group + strict)


@pytest.mark.parametrize("block_size", [1, 3, 16, 32])
def test_block_sizes_match_reference(block_size):
    check(MIXED, group=2, head_size=64, dtype=torch.float16, block_size=block_size, strict=True, window=9,
          seed=block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_splits", [2, 3, 7])
@pytest.mark.parametrize("strict,window", [(False, None), (True, None), (True, 20)], ids=["causal", "strict", "w20"])
def test_split_kv_decode(dtype, num_splits, strict, window):
    # 7 splits of the 1..101-key ranges (16-key tiles) leaves trailing partitions empty: they must weigh 0.
    check(DECODE, num_kv_heads=2, group=3, head_size=80, dtype=dtype, strict=strict, window=window,
          num_splits=num_splits, seed=num_splits)


def test_split_kv_mixed_batch():
    """The split path is generic: prefill tiles are partitioned the same way."""
    check(MIXED, num_kv_heads=1, group=2, strict=True, num_splits=3, seed=5)


def test_default_launch_configuration():
    """num_splits / block_n left to the launcher (64-key tiles here)."""
    check(MIXED + DECODE, num_kv_heads=2, group=4, head_size=64, dtype=torch.float16, strict=True,
          num_splits=None, block_n=None, seed=3)


def test_strict_position_zero_alone():
    """A batch of only first tokens under strict: nothing to see, output exactly 0 (not NaN, not uniform)."""
    check([(0, 1), (0, 1)], group=2, strict=True, seed=4)


# ---- StreamingLLM reads: sinks + window over unrotated keys, rotated in the kernel ----------------------------------
STREAM_MIXED = [(0, 1), (0, 7), (13, 5), (30, 1), (16, 16), (0, 19), (41, 3), (70, 2)]


def check_streaming(ctx_q, *, sinks, window, num_kv_heads=2, group=2, head_size=32, dtype=torch.float32, block_size=8,
                    strict=False, block_n=16, theta=10000.0, seed=0, fp8=None, scales=(1.0, 1.0)):
    q, kv, qsl, seq_lens, bt = make_batch(ctx_q, num_kv_heads, group, head_size, dtype, block_size, seed)
    # the pages between the sinks and the first query's window were freed: poison them
    for s, (c, _) in enumerate(ctx_q):
        for p in range(sinks, max(sinks, c - window + 1)):
            kv[int(bt[s, p // block_size]) * block_size + p % block_size] = float("nan")
    kv = to_fp8_pages(kv, fp8, scales)
    scale = head_size ** -0.5
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=DEVICE)
    on = lambda x: x.to(DEVICE)  # noqa: E731
    got = paged_attention(
        on(q), on(kv), query_start_loc=on(qsl), seq_lens=on(seq_lens), block_table=on(bt), block_size=block_size,
        scale=scale, strict=strict, max_query_len=max(n for _, n in ctx_q), max_seq_len=int(seq_lens.max()),
        out=out, block_n=block_n, streaming=(sinks, window, theta), fp8=fp8, scales=scales)
    ref = streaming_attention_ref(q, kv, qsl, seq_lens, bt, block_size, scale, strict, sinks, window, theta, fp8=fp8,
                                  scales=scales)
    got = got.cpu().to(torch.float64)
    assert not got.isnan().any(), "NaN in the output: a row was not written or a freed slot was read"
    err = (got - ref).abs().max().item()
    assert err <= TOLERANCE[dtype] * 5, f"max |err| {err:.3g} ({dtype})"  # + the rotation in fp32
    return err


@pytest.mark.parametrize("strict", [False, True], ids=["causal", "strict"])
@pytest.mark.parametrize("sinks,window", [(3, 10), (0, 6), (4, 1), (16, 20)])
def test_streaming_reads_match_reference(strict, sinks, window):
    check_streaming(STREAM_MIXED, sinks=sinks, window=window, strict=strict, seed=sinks + window + strict)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_streaming_reads_half_precision_gqa_head_64(dtype):
    check_streaming(STREAM_MIXED, sinks=4, window=12, num_kv_heads=1, group=4, head_size=64, dtype=dtype,
                    strict=True, block_size=16, theta=500000.0, seed=7)


# ---- fp8 pages: uint8 pages of e4m3fn / e5m2 values, read as fp8 * scale (docs/semantics.md, section 6) ----------
@pytest.mark.parametrize("fp8", ["fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strict,window", [(False, None), (True, None), (True, 5)], ids=["causal", "strict", "w5"])
def test_fp8_pages_mixed_batch(fp8, dtype, strict, window):
    # scales that are not powers of two, and different for K and V: a kernel that ignores or swaps them fails
    check(MIXED, num_kv_heads=2, group=3, head_size=64, dtype=dtype, strict=strict, window=window, fp8=fp8,
          scales=(0.37, 1.9), seed=21 + strict)


@pytest.mark.parametrize("fp8", ["fp8", "fp8_e5m2"])
def test_fp8_pages_split_kv_decode(fp8):
    check(DECODE, num_kv_heads=2, group=3, head_size=80, dtype=torch.float16, strict=True, num_splits=3, fp8=fp8,
          scales=(0.6, 0.3), seed=22)


def test_fp8_pages_streaming_reads():
    check_streaming(STREAM_MIXED, sinks=3, window=10, strict=True, fp8="fp8_e4m3", scales=(0.45, 2.2), seed=23)


def test_fp8_reads_depend_on_the_scales():
    """The same bytes read with other scales give other outputs (the check above is not blind to them)."""
    q, kv, qsl, seq_lens, bt = make_batch(MIXED, 2, 2, 32, torch.float32, 8, 24)
    pages = to_fp8_pages(kv, "fp8", (0.5, 0.5))
    kw = dict(query_start_loc=qsl.to(DEVICE), seq_lens=seq_lens.to(DEVICE), block_table=bt.to(DEVICE), block_size=8,
              scale=32 ** -0.5, strict=True, fp8="fp8")
    a = paged_attention(q.to(DEVICE), pages.to(DEVICE), scales=(0.5, 0.5), **kw).cpu()
    b = paged_attention(q.to(DEVICE), pages.to(DEVICE), scales=(0.5, 1.0), **kw).cpu()
    live = [i for i in range(q.shape[0]) if i not in no_key_rows(MIXED, True, None)]
    assert torch.allclose(2 * a[live], b[live], rtol=1e-5, atol=1e-6)  # V scale doubles the output
