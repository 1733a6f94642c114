"""The LCKV attention backend for vLLM (backend.py), the per-step object (step.py) and the attention paths that do the
math behind one interface (base.py): torch_path.py, cpu.py, triton_path.py, chosen once per engine by select.py."""
