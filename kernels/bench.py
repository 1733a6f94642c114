"""CUDA benchmark of the paged-attention kernel (`paged_attention.py`) against vLLM's own Triton attention.

    python kernels/bench.py --out benchmarks/kernels.json            # defaults: bf16, 32 q / 8 KV heads of 128
    python kernels/bench.py --quick --out /tmp/k.json                # a few cases, for a smoke run

What it measures, on one set of pages (the LCKV slot layout, which is also the layout of vLLM's TRITON_ATTN
backend: `[num_blocks, block_size, num_kv_heads, 2 * head_size]`, K then V, so both kernels read the same bytes):
* decode: one query per sequence, context 1k / 4k / 16k, batch 1 .. 64, shuffled block tables;
* prefill: whole prompts (and one mixed batch: a prefill chunk beside decodes);
each in two modes: `strict` (LCKV's "keys < t", the consumer layers) and `causal` ("keys <= t", producers).
vLLM has no strict mode; its kernel run with seq_lens - 1 does the same work (bottom-right aligned mask, one key
fewer), so that is the baseline for `strict` (its rows with no key are not comparable and are excluded from the
output comparison).

Reported per case: median time (triton.testing.do_bench, L2 flushed between runs), achieved bandwidth of the bytes
the kernel must move (visible K/V + q + out), that bandwidth as a fraction of a measured device-to-device copy, for
prefill also TFLOP/s, vLLM's time and the ratio, and the max |difference| between the two outputs.  Results go to
JSON.  Needs a CUDA GPU; the CPU interpreter is far too slow for this.  (Named bench.py, not test_*.py, so pytest
does not collect it.)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _bench(fn) -> float:
    """Median milliseconds of fn() with the L2 cache flushed before each run."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _warm_up(device: torch.device, seconds: float = 2.0) -> None:
    """Busy the GPU for a moment so its clocks are up before the first timed case (the first case of an earlier run
    measured 2x slower than its twin mode)."""
    a = torch.randn(4096, 4096, device=device, dtype=torch.bfloat16)
    t = time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(20):
            a @ a
        torch.cuda.synchronize()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + bytes written), the practical ceiling for a kernel
    that streams its input once."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _bench(lambda: dst.copy_(src))
    return 2 * nbytes / (ms * 1e-3) / 1e9


class Pages:
    """Paged K/V for a batch: every sequence gets its own, shuffled set of blocks."""

    def __init__(self, ctx_q: list[tuple[int, int]], num_kv_heads: int, head_size: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, seed: int = 0, kv_fp8: str | None = None):
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.ctx_q = ctx_q
        self.block_size = block_size
        blocks = [math.ceil((c + q) / block_size) for c, q in ctx_q]
        num_blocks = sum(blocks)
        perm = torch.randperm(num_blocks, generator=g)
        table = torch.zeros(len(ctx_q), max(blocks), dtype=torch.int32)
        used = 0
        for s, n in enumerate(blocks):
            table[s, :n] = perm[used:used + n]
            used += n
        self.block_table = table.to(device)
        # [num_blocks, block_size, num_kv_heads, 2 * head_size]: physical order of both backends' pages
        self.pages = torch.randn(num_blocks, block_size, num_kv_heads, 2 * head_size, device=device).to(dtype)
        if kv_fp8:  # uint8 pages holding fp8 values (scale 1), as vLLM allocates them
            from lckv_vllm.kernels.torch_reference import fp8_bits_ref

            self.pages = fp8_bits_ref(self.pages, kv_fp8, 1.0)
        self.slots = self.pages.view(num_blocks * block_size, num_kv_heads, 2 * head_size)
        q_lens = torch.tensor([q for _, q in ctx_q])
        qsl = torch.zeros(len(ctx_q) + 1, dtype=torch.int32)
        qsl[1:] = q_lens.cumsum(0)
        self.query_start_loc = qsl.to(device)
        self.seq_lens = torch.tensor([c + q for c, q in ctx_q], dtype=torch.int32, device=device)
        self.max_query_len = int(q_lens.max())
        self.max_seq_len = max(c + q for c, q in ctx_q)
        self.num_tokens = int(qsl[-1])


def visible_pairs(ctx_q, strict: bool) -> int:
    """Number of (query, key) pairs the mask lets through: the work of the kernel."""
    total = 0
    for c, q in ctx_q:
        for i in range(q):
            total += c + i + (0 if strict else 1)
    return total


def case_bytes(ctx_q, strict: bool, num_heads: int, num_kv_heads: int, head_size: int, elem: int,
               kv_elem: int | None = None) -> int:
    """Bytes a kernel must move at least: each sequence's visible K/V once (`kv_elem` bytes per element: 1 for fp8
    pages), q in, out back."""
    kv = 0
    for c, q in ctx_q:
        keys = c + q - (1 if strict else 0)  # keys visible to the sequence's last query
        kv += keys * num_kv_heads * 2 * head_size * (kv_elem or elem)
    tokens = sum(q for _, q in ctx_q)
    return kv + 2 * tokens * num_heads * head_size * elem


def _vllm_attention(source: str | None = None):
    """vLLM's unified Triton attention, or None with the reason (benchmark runs on without it).

    `source`: a folder holding vLLM 0.32's `triton_unified_attention.py` and `triton_attention_helpers.py`, for a
    GPU machine where vLLM itself cannot be installed (no network, and its CUDA wheel is far larger than what can be
    carried).  Those two files need only torch and Triton plus five small vLLM names, which `_stub_vllm` provides;
    the kernels themselves are vLLM's, unmodified, so the baseline is the real thing.
    """
    try:
        if source:
            return _load_vllm_attention(source), None
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
    except Exception as e:  # noqa: BLE001 - any import failure just means "no baseline"
        return None, f"{type(e).__name__}: {e}"
    return unified_attention, None


def _load_vllm_attention(source: str):
    import enum
    import importlib.util
    import logging
    import os
    import types

    import triton
    import triton.language as tl

    def module(name, **attrs):
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m
        return m

    class KVQuantMode(enum.IntEnum):  # the members the kernel file names, with vLLM 0.32's values
        NONE = 0
        FP8_PER_TENSOR = 1
        INT8_PER_TOKEN_HEAD = 2
        FP8_PER_TOKEN_HEAD = 3
        INT4_PER_TOKEN_HEAD = 4

    class Platform:
        @staticmethod
        def fp8_dtype():
            return torch.float8_e4m3fn

        @staticmethod
        def is_device_capability_family(major: int) -> bool:
            return torch.cuda.get_device_capability()[0] == major // 10

    for name in ("vllm", "vllm.v1", "vllm.v1.attention", "vllm.v1.attention.ops"):
        module(name, __path__=[])
    module("vllm.envs", VLLM_BATCH_INVARIANT=False)
    module("vllm.logger", init_logger=logging.getLogger)
    module("vllm.platforms", current_platform=Platform())
    module("vllm.triton_utils", tl=tl, triton=triton)
    module("vllm.v1.kv_cache_interface", KVQuantMode=KVQuantMode)
    loaded = None
    for stem in ("triton_attention_helpers", "triton_unified_attention"):
        name = f"vllm.v1.attention.ops.{stem}"
        spec = importlib.util.spec_from_file_location(name, os.path.join(source, f"{stem}.py"))
        loaded = importlib.util.module_from_spec(spec)
        sys.modules[name] = loaded
        spec.loader.exec_module(loaded)
    return loaded.unified_attention


def run_case(kind, ctx_q, mode, args, device, copy_gbps, vllm_fn):
    from lckv_vllm.kernels.paged_attention import paged_attention

    dtype = DTYPES[args.dtype]
    hq, hk, d = args.num_heads, args.num_kv_heads, args.head_size
    strict = mode == "strict"
    pg = Pages(ctx_q, hk, d, args.block_size, dtype, device, kv_fp8=args.kv_fp8)
    q = torch.randn(pg.num_tokens, hq, d, device=device).to(dtype)
    out = torch.empty_like(q)
    scale = d ** -0.5

    def ours():
        paged_attention(q, pg.slots, query_start_loc=pg.query_start_loc, seq_lens=pg.seq_lens,
                        block_table=pg.block_table, block_size=pg.block_size, scale=scale, strict=strict,
                        max_query_len=pg.max_query_len, max_seq_len=pg.max_seq_len, out=out, fp8=args.kv_fp8,
                        scales=(1.0, 1.0))

    ours()
    torch.cuda.synchronize()
    t_ours = _bench(ours)
    nbytes = case_bytes(ctx_q, strict, hq, hk, d, q.element_size(), kv_elem=1 if args.kv_fp8 else None)
    flops = 4 * hq * d * visible_pairs(ctx_q, strict)
    row = dict(kind=kind, mode=mode, batch=len(ctx_q), context=max(c for c, _ in ctx_q),
               query_len=pg.max_query_len, num_tokens=pg.num_tokens, ours_ms=t_ours,
               ours_GBps=nbytes / (t_ours * 1e-3) / 1e9, ours_TFLOPs=flops / (t_ours * 1e-3) / 1e12)
    row["ours_frac_of_copy"] = row["ours_GBps"] / copy_gbps

    if vllm_fn is not None:
        try:
            row.update(_run_vllm(vllm_fn, pg, q, out, strict, scale, hk, d, nbytes, flops, copy_gbps))
        except Exception as e:  # noqa: BLE001 - report, keep benchmarking our kernel
            row["vllm_error"] = f"{type(e).__name__}: {e}"
    return row


def _run_vllm(unified_attention, pg, q, ours_out, strict, scale, hk, d, nbytes, flops, copy_gbps):
    # Strict = vLLM's causal kernel over one key fewer (bottom-right alignment): query t then sees keys <= t - 1.
    seq_lens = pg.seq_lens - 1 if strict else pg.seq_lens
    k_cache, v_cache = pg.pages.split(d, dim=-1)  # views of the same pages, [num_blocks, block_size, Hk, D]
    out = torch.empty_like(q)
    num_seqs = len(pg.ctx_q)
    one = torch.ones(1, dtype=torch.float32, device=q.device)
    # The decode path with parallel softmax segments, sized as vLLM's TRITON_ATTN backend sizes it.
    segments = 16
    threshold = max(1, 128 // hk)
    rows = max(threshold, pg.num_tokens)
    seg_out = torch.empty(rows, q.shape[1], segments, 1 << (d - 1).bit_length(), dtype=torch.float32,
                          device=q.device)
    seg_max = torch.empty(rows, q.shape[1], segments, dtype=torch.float32, device=q.device)
    seg_sum = torch.empty_like(seg_max)

    def theirs():
        unified_attention(
            q=q, k=k_cache, v=v_cache, out=out, cu_seqlens_q=pg.query_start_loc, max_seqlen_q=pg.max_query_len,
            seqused_k=seq_lens, max_seqlen_k=pg.max_seq_len, softmax_scale=scale, causal=True,
            window_size=(-1, -1), block_table=pg.block_table, softcap=0, q_descale=None,
            k_descale=one.expand(num_seqs, hk), v_descale=one.expand(num_seqs, hk),
            seq_threshold_3D=threshold, num_par_softmax_segments=segments, softmax_segm_output=seg_out,
            softmax_segm_max=seg_max, softmax_segm_expsum=seg_sum,
        )

    theirs()
    torch.cuda.synchronize()
    t = _bench(theirs)
    # Compare outputs where both are defined (strict: skip queries with no visible key).
    keep = torch.ones(q.shape[0], dtype=torch.bool, device=q.device)
    if strict:
        t0 = 0
        for c, n in pg.ctx_q:
            if c == 0:
                keep[t0] = False
            t0 += n
    diff = (out[keep].float() - ours_out[keep].float()).abs().max().item() if keep.any() else 0.0
    return dict(vllm_ms=t, vllm_GBps=nbytes / (t * 1e-3) / 1e9, vllm_TFLOPs=flops / (t * 1e-3) / 1e12,
                vllm_frac_of_copy=nbytes / (t * 1e-3) / 1e9 / copy_gbps, max_abs_diff_vs_vllm=diff)


def cases(quick: bool):
    contexts = [1024, 4096] if quick else [1024, 4096, 16384]
    batches = [1, 16] if quick else [1, 4, 16, 32, 64]
    for ctx in contexts:
        for b in batches:
            yield "decode", [(ctx, 1)] * b
    prompts = [(1, 1024)] if quick else [(1, 512), (1, 2048), (4, 2048), (1, 8192)]
    for b, n in prompts:
        yield "prefill", [(0, n)] * b
    if not quick:
        yield "mixed", [(2048, 512)] + [(4096, 1)] * 63  # a chunked-prefill step beside decodes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="kernel_bench.json")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--num-heads", type=int, default=32)
    ap.add_argument("--num-kv-heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--modes", default="strict,causal")
    ap.add_argument("--quick", action="store_true", help="a handful of cases")
    ap.add_argument("--no-vllm", action="store_true", help="skip the vLLM baseline")
    ap.add_argument("--vllm-source", default=None,
                    help="folder with vLLM's triton_unified_attention.py + triton_attention_helpers.py, where vLLM "
                         "is not installed (see _vllm_attention)")
    ap.add_argument("--vllm-source-version", default="0.32.0", help="the vLLM version those files come from")
    ap.add_argument("--tag", default="", help="free text stored in the JSON (e.g. the shape's name)")
    ap.add_argument("--kv-fp8", choices=["fp8_e4m3", "fp8_e5m2"], help="fp8 pages (uint8, scale 1); no vLLM baseline: "
                    "compare with a run of the same dtype without this flag")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernels/bench.py needs a CUDA GPU (the Triton interpreter is for correctness tests only)",
              file=sys.stderr)
        return 2
    device = torch.device("cuda")
    import triton

    if args.kv_fp8:
        args.no_vllm = True  # fp8 pages are compared with our own pages of the model dtype (gpu_kernels.sh)
    vllm_fn, vllm_why = (None, "disabled (--no-vllm)") if args.no_vllm else _vllm_attention(args.vllm_source)
    _warm_up(device)
    copy_gbps = copy_bandwidth(device)
    print(f"{torch.cuda.get_device_name(device)}: device-to-device copy {copy_gbps:.0f} GB/s; "
          f"vLLM baseline: {'yes' if vllm_fn else vllm_why}")
    results = []
    header = f"{'kind':8} {'mode':6} {'batch':>5} {'ctx':>6} {'qlen':>5} {'ours ms':>9} {'GB/s':>7} {'%copy':>6} " \
             f"{'vllm ms':>9} {'ratio':>6} {'maxdiff':>8}"
    print(header)
    for kind, ctx_q in cases(args.quick):
        for mode in args.modes.split(","):
            row = run_case(kind, ctx_q, mode, args, device, copy_gbps, vllm_fn)
            if "vllm_ms" in row:
                row["ours_speedup"] = row["vllm_ms"] / row["ours_ms"]  # > 1: ours is faster
            results.append(row)
            print(f"{kind:8} {mode:6} {row['batch']:5d} {row['context']:6d} {row['query_len']:5d} "
                  f"{row['ours_ms']:9.4f} {row['ours_GBps']:7.0f} {100 * row['ours_frac_of_copy']:5.1f}% "
                  f"{row.get('vllm_ms', float('nan')):9.4f} {row.get('ours_speedup', float('nan')):6.2f} "
                  f"{row.get('max_abs_diff_vs_vllm', float('nan')):8.2g}")
            torch.cuda.empty_cache()
    try:
        import vllm

        vllm_version = vllm.__version__
    except Exception:  # noqa: BLE001 - stubbed (--vllm-source) or absent
        vllm_version = (f"{args.vllm_source_version} (kernel files loaded from {args.vllm_source})"
                        if args.vllm_source else None)
    report = dict(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        device=torch.cuda.get_device_name(device),
        python=platform.python_version(), torch=torch.__version__, triton=triton.__version__, vllm=vllm_version,
        tag=args.tag, dtype=args.dtype, kv_fp8=args.kv_fp8, num_heads=args.num_heads, num_kv_heads=args.num_kv_heads,
        head_size=args.head_size,
        block_size=args.block_size, copy_bandwidth_GBps=copy_gbps, vllm_baseline=vllm_fn is not None,
        vllm_baseline_note=None if vllm_fn else vllm_why,
        notes="strict mode: vLLM runs its causal kernel with seq_lens - 1; bandwidth counts visible K/V + q + out "
              "bytes; ours_speedup = vllm_ms / ours_ms",
        results=results,
    )
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
