# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lpcam-installed
HOSTS_STAMP := $(VENV)/.lpcam-hosts-installed
DEMO_OUT ?= lpcam_demo_out
PYTEST_ARGS ?=

.PHONY: install demo test bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# Reinstall only when the package metadata changes (editable install: code edits need none).
# --no-compile: pip would byte-compile all of torch (~40 s on two cores); the import below
# compiles only the modules the demo loads (~10 s), even where PYTHONDONTWRITEBYTECODE is set.
$(STAMP): $(PY) setup.cfg pyproject.toml
	$(PY) -m pip install --quiet --no-compile -e '.[test]'
	PYTHONDONTWRITEBYTECODE= $(PY) -c 'import numpy, PIL, imageio, tqdm, yaml, torch'
	touch $(STAMP)

# `make test` adds the hosts, mctformer and clip-es extras: what the host integration tests need
# (LPCAM_HOSTS=<folder of host clones> make test); the demo does without them.
$(HOSTS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-compile -e '.[test,hosts,mctformer,clip-es]'
	touch $(HOSTS_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/lpcam demo --out $(DEMO_OUT)

test: $(HOSTS_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/speed.py

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache build *.egg-info
