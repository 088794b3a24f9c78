# The two set-up commands: `make demo` and `make test`. Both create .venv when it is missing
# and install exactly what locks/dev.lock pins (every package, with hashes), so a new
# upstream release cannot change what they run. `make lock` regenerates the lock.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
UV_VERSION := 0.13.8
STAMP  := $(VENV)/.installed
PORTRAIT_HOME ?= $(CURDIR)/.portrait-home
export PORTRAIT_HOME
# Model hubs are unreachable here and the tiny preset never needs them.
export HF_HUB_OFFLINE ?= 1
# torch 2.14.1 and its CUDA libraries lie on this machine's disk (the same files, same sha256,
# as on PyPI): let uv take them from there instead of downloading ~4 GB.
LOCAL_WHEELS := $(wildcard /opt/pypi-more/files)
UV_SOURCES := $(if $(LOCAL_WHEELS),--find-links $(LOCAL_WHEELS))

.PHONY: demo test test-fast install install-gpu lock check-lock bench clean

check-lock:
	@$(PYTHON) scripts/lock.py check

$(STAMP): locks/dev.lock pyproject.toml
	@$(PYTHON) scripts/lock.py check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv==$(UV_VERSION)
	# Exactly the lock: sync adds what is missing and removes what the lock does not name.
	# --compile-bytecode writes every module's .pyc now: where PYTHONDONTWRITEBYTECODE is set
	# (as on this machine) Python never caches them, and each process spent ~14 s of its start
	# compiling the ~3,600 modules torch/diffusers/transformers import (measured with cProfile).
	$(UV) pip sync -q --python $(PY) --require-hashes --compile-bytecode $(UV_SOURCES) locks/dev.lock
	$(UV) pip install -q --python $(PY) --no-deps --compile-bytecode -e .
	touch $(STAMP)

install: $(STAMP)

# A CUDA machine: the runtime with onnxruntime-gpu in place of the CPU onnxruntime (never both:
# they overwrite each other's files; scripts/lock.py says why an override does it) and
# optimum-quanto for the memory plan's int8/fp8/int4 steps.
install-gpu:
	@$(PYTHON) scripts/lock.py check
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	test -x $(UV) || $(PY) -m pip install -q uv==$(UV_VERSION)
	$(UV) pip sync -q --python $(PY) --require-hashes --compile-bytecode $(UV_SOURCES) locks/gpu.lock
	$(UV) pip install -q --python $(PY) --no-deps --compile-bytecode -e .

lock:
	test -x $(UV) || { test -x $(PY) || $(PYTHON) -m venv $(VENV); $(PY) -m pip install -q uv==$(UV_VERSION); }
	$(PY) scripts/lock.py compile

demo: $(STAMP)
	$(VENV)/bin/portrait demo --out outputs/demo

# Two workers, one file each at a time (module fixtures stay warm; each worker has its own tiny
# home). Measured on the 2-core box: 565 tests 6 min 45 s with -n 2 on a fresh clone (bytecode
# compiled at install; 555 tests took 8 min 57 s before that, 14 min 58 s serial).
test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) build dist *.egg-info .portrait-home outputs
