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
# Main job: register the bundled Colin27 brain (moving) to the bundled MNI152 template (fixed), 2 mm,
# with their AAL label maps for Dice before/after; outputs in demo_out/.
demo: $(STAMP)
	$(VENV)/bin/medreg register $(DATA)/mni152_t1_2mm.nii.gz $(DATA)/colin27_t1_2mm.nii.gz -o demo_out \
		--fixed-labels $(DATA)/mni152_aal_2mm.nii.gz --moving-labels $(DATA)/colin27_aal_2mm.nii.gz \
		--preset fast --threads 2 --overwrite

test: $(STAMP)
	$(PY) -m pytest -q -n 2

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

bench: $(STAMP)
	$(PIP) install -q -e '.[bench]'
	$(PY) benchmarks/bench_warp.py

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
