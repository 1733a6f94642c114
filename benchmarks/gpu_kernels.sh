#!/usr/bin/env bash
# The Triton kernels on a CUDA machine: correctness tests (kernels/test_*.py, compiled, not interpreted) and the
# benchmark against vLLM's own Triton attention (kernels/bench.py).  Written for a bare GPU box that has torch and
# Triton but no vLLM and no network: the package is not installed, so `lckv_vllm.kernels` (setup.py maps kernels/
# there) is provided by a temporary symlink, and vLLM's baseline kernel is loaded from its two source files in
# $VLLM_SRC (copy them from an installed vLLM 0.32: vllm/v1/attention/ops/triton_{unified_attention,
# attention_helpers}.py).  Results: $OUT (default benchmarks/results).
#
#   VLLM_SRC=.vllm_src bash benchmarks/gpu_kernels.sh            # tests + full benchmark
#   QUICK=1 bash benchmarks/gpu_kernels.sh                        # tests + a few benchmark cases
#   DTYPES="bf16 fp16" SHAPES="gqa: mha:--num-kv-heads,32" ...    # more dtypes / shapes (commas = spaces)
#   KV_FP8="fp8_e4m3 fp8_e5m2"                                    # fp8 pages too (default: fp8_e4m3), each run next
#                                                                 # to the same shape with pages in the model dtype
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
if ! $PY -c "import lckv_vllm.kernels" 2>/dev/null; then
  ln -s ../kernels lckv_vllm/kernels
  trap 'rm -f lckv_vllm/kernels' EXIT
fi
# kernels/bench.py and the compile test run as scripts: the repository root must be importable for them too
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_kernels_device.txt"
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu_kernels_device.txt"
$PY -m pytest -q -p no:cacheprovider kernels 2>&1 | tee "$OUT/gpu_kernel_tests.log"
tests_rc=${PIPESTATUS[0]}
src_args=()
[ -n "${VLLM_SRC:-}" ] && src_args=(--vllm-source "$VLLM_SRC")
# name:extra bench.py arguments; default shape: 32 query / 8 KV heads of 128 (Llama-3-8B-like GQA)
for shape in ${SHAPES:-gqa:}; do
  name=${shape%%:*}; extra=${shape#*:}
  for dt in ${DTYPES:-bf16}; do
    $PY kernels/bench.py ${QUICK:+--quick} --dtype "$dt" ${extra//,/ } --tag "$name" "${src_args[@]}" \
      --out "$OUT/kernels_${name}_${dt}.json" 2>&1 | tee -a "$OUT/gpu_kernel_bench.log"
    for fp8 in ${KV_FP8-fp8_e4m3}; do  # decode and prefill over fp8 pages: compare with the json above
      $PY kernels/bench.py ${QUICK:+--quick} --dtype "$dt" ${extra//,/ } --tag "$name" --kv-fp8 "$fp8" \
        --out "$OUT/kernels_${name}_${dt}_${fp8}.json" 2>&1 | tee -a "$OUT/gpu_kernel_bench.log"
    done
  done
done
exit "$tests_rc"
