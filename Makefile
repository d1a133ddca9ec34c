# Two entry points: `make demo` and `make test` (`make help` lists the rest). All build .venv once and reuse it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reverie-installed
TORCH := torch==2.13.0
PYTEST_ARGS ?=
DEMO_OUT ?= runs/demo
DEMO_SECONDS ?= 300

.PHONY: help demo test lint bench clean

help:
	@echo 'make demo    a learner and a simulated robot process on this machine, training ArmReach over the link'
	@echo 'make test    the test suite on 2 workers (PYTEST_ARGS=--run-slow adds the long learning checks)'
	@echo 'make lint    ruff over the repository'
	@echo 'make bench   every benchmark in bench/ in its quick mode (JSON on stdout; bench/README.md: full runs)'
	@echo 'make clean   remove .venv, runs/ and the pytest cache'

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

# Every script in bench/ as a smoke run, in its quick mode where it has one (a minute or two each); bench/README.md has
# the full runs and the figures they reached. The learning benchmark runs for hours: only its cases are listed.
bench: $(STAMP)
	$(PY) bench/sim_throughput.py
	$(PY) bench/learner_throughput.py --quick
	$(PY) bench/shared_cpu.py --quick
	$(PY) bench/link_throughput.py --quick
	$(PY) bench/control_loop.py --quick
	$(PY) bench/actor_updates.py --quick
	$(PY) bench/learning.py --list

clean:
	rm -rf $(VENV) runs .pytest_cache
