# medreg: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first, pinned: 2.13.0 is the CPU build on this machine's disk (an unpinned torch pulls CUDA).
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

DATA := src/medreg/data
demo: $(STAMP)
	mkdir -p demo_out
	$(VENV)/bin/medreg info $(DATA)/colin27_t1_2mm.nii.gz
	$(VENV)/bin/medreg apply $(DATA)/demo_rigid.tfm $(DATA)/colin27_t1_2mm.nii.gz \
		-r $(DATA)/colin27_t1_2mm.nii.gz -o demo_out/colin27_rigid.nii.gz --overwrite
	$(VENV)/bin/medreg apply $(DATA)/demo_rigid.tfm $(DATA)/colin27_aal_2mm.nii.gz \
		-r $(DATA)/colin27_t1_2mm.nii.gz -o demo_out/colin27_aal_rigid.nii.gz --interpolation nearest --overwrite

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/bench_warp.py

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
