# `make test`  : create .venv on a fresh machine, install, run the whole test suite (fast + slow).
# `make run`   : create .venv, install, fetch the default assets, run the main job (`s2d run`).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check

.PHONY: setup test test-fast run quick bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[test]'
	touch $@

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

run: setup
	$(VENV)/bin/s2d assets fetch minilm-l6 rotten-tomatoes
	$(VENV)/bin/s2d run --out runs/default

quick: setup
	$(VENV)/bin/s2d assets fetch minilm-l6 rotten-tomatoes
	$(VENV)/bin/s2d run --quick --out runs/quick

bench: setup
	$(VENV)/bin/s2d bench

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
