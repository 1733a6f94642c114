"""What a KV page stores: the model's dtype (`auto`), or 8-bit floats (`fp8` = `fp8_e4m3`, `fp8_e5m2`) with one
K scale and one V scale per producer, vLLM's convention.

A page holds `store(x, scale)` = fp8(x / scale), saturated to the format's largest finite value, and every read sees
`load(page, scale)` = fp8 value * scale: the value written, whatever pass or layer reads it (docs/semantics.md,
"fp8 pages").  Rounding is part of the format because vLLM's kernels disagree: its CUDA kernels round to nearest
(even), its CPU kernels (`cpu_attn_reshape_and_cache`, measured on vLLM 0.32 AVX-512) round toward zero.  The cpu
path stores through those kernels, so it declares `toward_zero`; the torch and Triton paths round to nearest.
vLLM allocates fp8 pages as uint8 tensors; `store` returns uint8 and `load` takes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# vLLM's --kv-cache-dtype names of the 8-bit formats -> the torch dtype whose bits a page holds
FP8_DTYPES = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
ROUNDINGS = ("nearest", "toward_zero")


@dataclass(frozen=True)
class PageDtype:
    name: str = "auto"  # vLLM's cache_dtype: "auto" (the model's dtype) or a key of FP8_DTYPES
    rounding: str = "nearest"  # fp8 only: "nearest" (ties to even) | "toward_zero"

    def __post_init__(self):
        if self.name != "auto" and self.name not in FP8_DTYPES:
            raise ValueError(f"page dtype {self.name!r}: the LCKV paths store 'auto' or one of {sorted(FP8_DTYPES)}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"rounding {self.rounding!r}: one of {ROUNDINGS}")

    @property
    def quantized(self) -> bool:
        return self.name != "auto"

    @property
    def fp8(self) -> torch.dtype | None:
        return FP8_DTYPES.get(self.name)

    @property
    def max(self) -> float:
        return float(torch.finfo(self.fp8).max)

    def store(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """The page bytes (uint8) of `x`: fp8(x / scale), saturated, rounded as `rounding` says."""
        y = (x.float() / scale).clamp(-self.max, self.max)
        q = y.to(self.fp8)
        if self.rounding == "toward_zero":
            # the cast rounded to nearest; where that moved away from zero, take the next code toward zero (fp8 is
            # sign-magnitude, so the magnitude code minus one is the next smaller magnitude)
            codes = q.view(torch.uint8)
            up = q.float().abs() > y.abs()
            return torch.where(up, codes - 1, codes)
        return q.view(torch.uint8)

    def load(self, raw: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
        """Page bytes back to values in `dtype`: fp8 value * scale."""
        return raw.view(self.fp8).to(dtype) * scale

    def round_trip(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """What a read of `x` after its write sees (x itself for unquantized pages)."""
        return self.load(self.store(x, scale), scale, x.dtype) if self.quantized else x


AUTO = PageDtype()


def page_dtype_of(cache_dtype: str | None, rounding: str = "nearest") -> PageDtype:
    """The page dtype of vLLM's `cache_config.cache_dtype` (anything not fp8 is the model's own dtype here: the
    start-up guard refuses other explicit dtypes before a path is built)."""
    return PageDtype(cache_dtype, rounding) if cache_dtype in FP8_DTYPES else AUTO
