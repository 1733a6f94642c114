"""Compile every kernel for CUDA (sm_80, sm_90) ahead of time, without a GPU.

The interpreter runs kernel bodies as plain Python and so forgives what the compiler rejects (type changes of
loop-carried values, dot shapes below the hardware minimum, non-constexpr shapes).  Triton's wheel ships the NVIDIA
backend and ptxas, so the compiled path can be checked here down to a cubin: a representative set of
configurations (dtypes, padded head sizes, GQA groups, flags, split-KV) per kernel.  Runs in a fresh process: this
one imports the kernels interpreted.  (`python kernels/test_cuda_compile.py` runs the compilation directly.)
"""

import os
import subprocess
import sys

import pytest

_PTR = {"fp16": "*fp16", "bf16": "*bf16", "fp32": "*fp32"}


def _attention(dt, head_size, group, strict, window, splits, block_q, block_n, block_size, streaming=False, fp8=0):
    import triton

    from lckv_vllm.kernels import paged_attention as pa

    fn = pa._paged_attention_kernel
    sig = dict(q_ptr=_PTR[dt], kv_ptr="*u8" if fp8 else _PTR[dt], out_ptr="*fp32" if splits > 1 else _PTR[dt],
               lse_ptr="*fp32", query_start_loc_ptr="*i32", seq_lens_ptr="*i32", block_table_ptr="*i32",
               scale_log2="fp32", sinks="i32", log2_theta="fp32", k_scale="fp32", v_scale="fp32")
    for name in ("num_seqs", "num_tokens", "num_heads", "window", "stride_qt", "stride_qh", "stride_slot",
                 "stride_kvh", "stride_os", "stride_ot", "stride_oh", "stride_bt"):
        sig[name] = "i32"
    const = dict(NUM_Q_PER_KV=group, HEAD_SIZE=head_size, BLOCK_D=triton.next_power_of_2(head_size),
                 BLOCK_G=triton.next_power_of_2(group), BLOCK_Q=block_q, BLOCK_N=block_n, BLOCK_SIZE=block_size,
                 STRICT=strict, USE_WINDOW=window, NUM_SPLITS=splits,
                 DOT_PRECISION="ieee" if dt == "fp32" else "tf32", UPCAST_DOT=False, STREAMING=streaming, FP8=fp8)
    return fn, sig, const


def _combine(dt, head_size, splits):
    import triton

    from lckv_vllm.kernels import paged_attention as pa

    sig = dict(part_ptr="*fp32", lse_ptr="*fp32", out_ptr=_PTR[dt], num_tokens="i32", num_heads="i32",
               stride_ot="i32", stride_oh="i32")
    const = dict(NUM_SPLITS=splits, BLOCK_S=triton.next_power_of_2(splits), HEAD_SIZE=head_size,
                 BLOCK_D=triton.next_power_of_2(head_size))
    return pa._combine_splits_kernel, sig, const


def _write(dt, head_size, heads, fp8=0):
    import triton

    from lckv_vllm.kernels import kv_cache as kc

    sig = dict(key_ptr=_PTR[dt], value_ptr=_PTR[dt], kv_ptr="*u8" if fp8 else _PTR[dt], slot_mapping_ptr="*i64",
               num_kv_heads="i32", stride_kt="i32", stride_kh="i32", stride_vt="i32", stride_vh="i32",
               stride_slot="i32", stride_head="i32", k_scale="fp32", v_scale="fp32")
    const = dict(HEAD_SIZE=head_size, BLOCK_H=triton.next_power_of_2(heads),
                 BLOCK_D=triton.next_power_of_2(head_size), FP8=fp8)
    return kc._write_kv_kernel, sig, const


def _zero(dt, head_size, heads):
    import triton

    from lckv_vllm.kernels import kv_cache as kc

    sig = dict(kv_ptr=_PTR[dt], slot_mapping_ptr="*i32", num_kv_heads="i32", stride_slot="i32", stride_head="i32")
    const = dict(ROW=2 * head_size, BLOCK_H=triton.next_power_of_2(heads),
                 BLOCK_C=triton.next_power_of_2(2 * head_size))
    return kc._zero_slots_kernel, sig, const


def compile_all() -> None:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    jobs = [
        # (dtype, head_size, group, strict, window, splits, BLOCK_Q, BLOCK_N, page size)
        _attention("bf16", 128, 4, True, False, 1, 16, 32, 16),  # prefill tile, 64 rows
        _attention("fp16", 80, 3, False, True, 1, 16, 32, 16),  # padded head dim, odd group
        _attention("fp32", 64, 1, True, True, 1, 16, 64, 16),  # IEEE fp32 dots
        _attention("bf16", 96, 8, True, False, 4, 2, 32, 16),  # split-KV decode
        _attention("fp16", 32, 2, False, False, 8, 8, 64, 128),
        _attention("bf16", 128, 4, True, False, 1, 16, 32, 16, streaming=True),  # StreamingLLM prefill tile
        _attention("fp16", 80, 3, False, False, 1, 8, 64, 16, streaming=True),  # StreamingLLM decode, padded head
        _combine("bf16", 128, 4),
        _combine("fp32", 80, 7),
        _write("bf16", 128, 8),
        _write("fp32", 80, 3),
        # fp8 pages (uint8): e4m3 prefill tile, e5m2 split-KV decode, e4m3 streaming; the writes of both formats
        _attention("bf16", 128, 4, True, False, 1, 16, 32, 16, fp8=1),
        _attention("fp16", 64, 2, True, True, 4, 8, 64, 16, fp8=2),
        _attention("bf16", 64, 4, True, False, 1, 16, 32, 16, streaming=True, fp8=1),
        _write("bf16", 128, 8, fp8=1),
        _write("fp16", 64, 2, fp8=2),
        _zero("fp16", 96, 2),
    ]
    for arch in (80, 90):
        for fn, sig, const in jobs:
            signature = {name: sig.get(name, "constexpr") for name in fn.arg_names}
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=const),
                           target=GPUTarget("cuda", arch, 32), options=dict(num_warps=4, num_stages=2))
            print(f"sm_{arch} {fn.__name__} {const}: ok", flush=True)


def _have_cuda_backend() -> bool:
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        return False
    bin_dir = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin")
    return os.path.exists(os.path.join(bin_dir, "ptxas"))


@pytest.mark.skipif(not _have_cuda_backend(), reason="Triton without its NVIDIA backend / ptxas")
def test_kernels_compile_for_cuda():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert r.stdout.count(": ok") == 34


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "compile without the interpreter"
    compile_all()
