"""The Hugging Face config class for `model_type: "lckv-llama"` (the official LCKV checkpoint format).

It is Llama's config plus `layer_types` (a string such as "0_20_20_21"), `forward_passes`, `backward_passes`,
`force_nodiag`, `use_sequential` and `sliding_window`; `plan.py` reads them all (docs/semantics.md says what each
does to the served computation).

Why the string is kept under another attribute name in memory: transformers 5 treats a config attribute called
`layer_types` as a *list* of names like "full_attention" (it iterates it, remaps legacy names character by character
and validates the entries), and vLLM reads `hf_config.layer_types` with the same meaning.  The official checkpoints
store our string there, so the config moves it to `lckv_layer_types` on load and writes it back as `layer_types`
on save: the file format stays official, and neither library misreads it.
"""

from __future__ import annotations

import sys

from transformers import LlamaConfig

from .plan import DEFAULT_BACKWARD_PASSES, DEFAULT_FORWARD_PASSES, LayerPlan, plan_from_config

MODEL_TYPE = "lckv-llama"
ARCHITECTURE = "LCKVLlamaForCausalLM"


class LCKVLlamaConfig(LlamaConfig):
    model_type = MODEL_TYPE

    lckv_layer_types: str | None = None
    forward_passes: int = DEFAULT_FORWARD_PASSES
    backward_passes: int = DEFAULT_BACKWARD_PASSES
    force_nodiag: bool = False
    use_sequential: bool = False
    sliding_window: int | None = None

    def __post_init__(self, **kwargs):
        layer_types = kwargs.pop("layer_types", None)
        if layer_types is not None:
            self.lckv_layer_types = _as_string(layer_types)
        super().__post_init__(**kwargs)
        if self.lckv_layer_types is None:
            self.lckv_layer_types = "_".join(str(i) for i in range(self.num_hidden_layers))

    def __setattr__(self, name, value):
        # `config.update({"layer_types": ...})` is how vLLM applies `--hf-overrides` / `LLM(hf_overrides=...)`: route
        # it to the attribute the plan reads, and remember the checkpoint's own plan so the model can say it was
        # overridden (and the weight loader can name the override when a new producer has no k/v weights).
        if name == "layer_types":
            if value is None:
                return
            value = _as_string(value)
            current = self.__dict__.get("lckv_layer_types")
            if current is not None and current != value and "lckv_checkpoint_layer_types" not in self.__dict__:
                object.__setattr__(self, "lckv_checkpoint_layer_types", current)
            name = "lckv_layer_types"
        super().__setattr__(name, value)

    @property
    def layer_types_overridden_from(self) -> str | None:
        """The checkpoint's `layer_types` when an override replaced it, else None."""
        original = self.__dict__.get("lckv_checkpoint_layer_types")
        return original if original is not None and original != self.lckv_layer_types else None

    def to_dict(self):
        d = super().to_dict()
        d["layer_types"] = d.pop("lckv_layer_types", self.lckv_layer_types)
        d.pop("lckv_checkpoint_layer_types", None)  # bookkeeping of this process, not part of the format
        return d

    def to_diff_dict(self):
        d = super().to_diff_dict()
        if "lckv_layer_types" in d:
            d["layer_types"] = d.pop("lckv_layer_types")
        d.pop("lckv_checkpoint_layer_types", None)
        return d

    @property
    def plan(self) -> LayerPlan:
        return plan_from_config(self)


def _as_string(layer_types) -> str:
    """`layer_types` as the official string; a list of entries (["0", "2", "2"] or [0, 2, 2]) is tolerated."""
    if isinstance(layer_types, (list, tuple)):
        return "_".join(str(x) for x in layer_types)
    return layer_types


def register_hf_config() -> None:
    """Teach transformers' `AutoConfig` the `lckv-llama` model type, and nothing else (no vLLM import): enough for
    `AutoConfig` and `AutoTokenizer.from_pretrained(checkpoint_dir)`, which reads config.json first.  `register()`
    does this too, plus the vLLM parts.  Idempotent."""
    from transformers import AutoConfig

    try:
        AutoConfig.register(MODEL_TYPE, LCKVLlamaConfig)
    except ValueError:  # already registered in this process (exist_ok differs across transformers versions)
        pass


# The start-up hook (hf_autoconfig.py) fires when transformers' auto-config module is first imported; when that was
# this module's own `LlamaConfig` import, the class did not exist yet and the hook left the registration to here.
if getattr(sys.modules.get("lckv_vllm.hf_autoconfig"), "deferred", False):
    register_hf_config()
