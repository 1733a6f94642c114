"""The kernels under Triton's interpreter when Triton was imported *before* TRITON_INTERPRET was set.

That is the situation in every vLLM process: vLLM imports Triton at start-up, and the plugin (or the lazy import in
`lckv_vllm/engine/attention/triton_path.py`) can only switch the interpreter on afterwards.  Triton's own @triton.jit standard
library (tl.zeros, tl.max, tl.sum) is then compiled-mode and cannot be called from an interpreted kernel; the
kernels must not depend on it.  Runs in a fresh interpreter process, since this one already imported Triton.
"""

import os
import subprocess
import sys

import pytest
import torch

SCRIPT = r"""
import os
import triton  # first, with the interpreter off, as vLLM does
assert not triton.knobs.runtime.interpret
os.environ["TRITON_INTERPRET"] = "1"
import torch
from lckv_vllm.kernels.kv_cache import write_kv, zero_slots
from lckv_vllm.kernels.paged_attention import paged_attention
from lckv_vllm.kernels.torch_reference import paged_attention_ref, write_kv_ref, zero_slots_ref

g = torch.Generator().manual_seed(0)
slots = torch.randn(16, 2, 64, generator=g)
k, v = torch.randn(2, 5, 2, 32, generator=g)
sm = torch.tensor([3, -1, 7, 0, 12])
expect = slots.clone()
write_kv_ref(k, v, expect, sm)
zero_slots_ref(expect, sm[:2])
write_kv(k, v, slots, sm)
zero_slots(slots, sm[:2])
assert torch.equal(slots, expect)

q = torch.randn(4, 4, 32, generator=g)
qsl = torch.tensor([0, 1, 4], dtype=torch.int32)
seq_lens = torch.tensor([6, 3], dtype=torch.int32)
bt = torch.tensor([[3, 1], [2, 0]], dtype=torch.int32)
for splits in (1, 2):
    out = paged_attention(q, slots, query_start_loc=qsl, seq_lens=seq_lens, block_table=bt, block_size=4,
                          scale=0.2, strict=True, num_splits=splits, block_n=16)
    ref = paged_attention_ref(q, slots, qsl, seq_lens, bt, 4, 0.2, True, None)
    assert (out.double() - ref).abs().max() < 1e-5
print("ok")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter-only concern")
def test_kernels_work_when_triton_was_imported_before_the_interpreter_flag():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
