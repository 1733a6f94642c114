"""The LCKV attention backend for vLLM (backend.py), the per-step object (step.py) and its forward-context access
(context.py), and the attention paths that do the math behind one interface (base.py): torch_path.py, cpu_path.py
(with cpu_kernels.py), triton_path.py, and the StreamingLLM read (streaming_read.py); chooser.py alone knows them
all and picks one per engine."""
