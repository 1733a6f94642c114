"""Kernel tests run on CUDA when there is a GPU and under Triton's CPU interpreter otherwise.

The interpreter flag must be set before any module defining `@triton.jit` kernels is imported (Triton decides at
decoration time), hence here, before pytest imports the test modules.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
