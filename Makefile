# Two entry points: `make demo` and `make test`. Both build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reverie-installed
TORCH := torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo
DEMO_SECONDS ?= 300

.PHONY: demo test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

# A learner and one simulated robot process on this machine, training ArmReach over the real link.
demo: $(STAMP)
	$(PY) -m robot.demo --out $(DEMO_OUT) --seconds $(DEMO_SECONDS)

test: $(STAMP)
	$(PY) -m pytest -n 2 $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/sim_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
