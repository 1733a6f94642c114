"""The serving engine side of the plugin: what vLLM runs while it builds its config and inside its worker every step.

`startup.py` (the config hook: checks and settings before weights load) with `features.py` (the feature matrix and
its start-up guard); `model.py` (LCKVLlamaForCausalLM: layers, consumer binding, the walk over segments),
`segments.py` (each segment's compiled units and producers), `prefill.py` (the pass loop of cyclic segments:
passes, adaptive stop, telemetry), `resume.py` (re-encoding after preemption and for speculative verify steps),
`weights.py` (checkpoint names -> vLLM's parameters), `connector.py` (KV transfer of producer pages),
`sink_window_pages.py` (StreamingLLM's KV spec), `attention/` (the backend, the per-step object and the attention
paths) and `vllm_patches.py` (every patch of vLLM).  All of it derives from `lckv_vllm.plan` and
`lckv_vllm.settings`.
"""
