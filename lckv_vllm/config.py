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
            if isinstance(layer_types, (list, tuple)):  # tolerate a list of entries
                layer_types = "_".join(str(x) for x in layer_types)
            self.lckv_layer_types = layer_types
        super().__post_init__(**kwargs)
        if self.lckv_layer_types is None:
            self.lckv_layer_types = "_".join(str(i) for i in range(self.num_hidden_layers))

    def to_dict(self):
        d = super().to_dict()
        d["layer_types"] = d.pop("lckv_layer_types", self.lckv_layer_types)
        return d

    def to_diff_dict(self):
        d = super().to_diff_dict()
        if "lckv_layer_types" in d:
            d["layer_types"] = d.pop("lckv_layer_types")
        return d

    @property
    def plan(self) -> LayerPlan:
        return plan_from_config(self)
