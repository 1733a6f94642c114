"""Stock transformers knows `model_type: "lckv-llama"` in every interpreter of an environment with lckv-vllm installed.

Why: `AutoTokenizer.from_pretrained(checkpoint)` loads config.json before tokenizer_config.json, and transformers 5
cannot parse an official LCKV config on its own (unknown model type, and its generic fallback rejects the
`layer_types` string).  Tools that take only a path and call AutoTokenizer themselves (lm-eval-harness, scripts)
could not load a checkpoint's tokenizer.  Registering the config class is enough, but only vLLM loads plugins.

How: the installation puts `lckv_vllm-autoconfig.pth` into site-packages (setup.py, for wheels and editable
installs).  Python runs it at start-up; it calls `install()`, which only adds a one-shot import hook: nothing is
imported at start-up but this module.  When transformers' auto-config module is first imported, the hook lets it
execute and then registers `LCKVLlamaConfig` with its `AutoConfig` (what `config.register_hf_config()` does), and
leaves `sys.meta_path`.  vLLM is never imported by it.

`LCKV_HF_AUTOCONFIG=0` turns it off: the interpreter then behaves as if the plugin were not installed.  A failure here
must never break transformers' import: it is reported as a warning and the module imports as usual.
"""

from __future__ import annotations

import os
import sys
import warnings

TARGET = "transformers.models.auto.configuration_auto"
ENV = "LCKV_HF_AUTOCONFIG"


def enabled() -> bool:
    return os.environ.get(ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# True when the hook fired while lckv_vllm.config itself was importing transformers (its `LlamaConfig` import pulls in
# the auto-config module): the class did not exist yet, so config.py registers at the end of its own import.
deferred = False


def register(module) -> bool:
    """Register the LCKV config with the `AutoConfig` of the executed auto-config module; True when it is known."""
    global deferred
    config = sys.modules.get("lckv_vllm.config")
    if config is not None and not hasattr(config, "register_hf_config"):
        deferred = True
        return False
    try:
        from .config import MODEL_TYPE, LCKVLlamaConfig

        try:
            module.AutoConfig.register(MODEL_TYPE, LCKVLlamaConfig)
        except ValueError:  # registered already (vLLM's plugin hook, or register_hf_config())
            pass
        return True
    except Exception as e:  # an unexpected transformers: keep it importable, say why the checkpoints won't load
        warnings.warn(f"lckv-vllm: could not register model type 'lckv-llama' with transformers' AutoConfig ({e!r}); "
                      "AutoTokenizer/AutoConfig on LCKV checkpoints need lckv_vllm.config.register_hf_config() "
                      f"first (set {ENV}=0 to silence this)", RuntimeWarning, stacklevel=2)
        return False


class AutoConfigHook:
    """A meta path finder that watches for one module only and steps aside after it has been seen."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        self.remove()
        spec = None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if find is not None and (spec := find(name, path, target)) is not None:
                break
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec  # nothing we can wrap; Python reports a missing module as usual
        run = spec.loader.exec_module

        def exec_module(module):  # the loader is this module's own (one per spec)
            run(module)
            register(module)

        spec.loader.exec_module = exec_module
        return spec

    def remove(self) -> None:
        sys.meta_path[:] = [f for f in sys.meta_path if f is not self]


def install() -> None:
    """Called by the .pth file at start-up.  Idempotent; cheap (no imports)."""
    if not enabled() or any(isinstance(f, AutoConfigHook) for f in sys.meta_path):
        return
    if TARGET in sys.modules:  # imported already (install() called late): register directly
        register(sys.modules[TARGET])
        return
    sys.meta_path.insert(0, AutoConfigHook())
