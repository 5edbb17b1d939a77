# medreg: the README's two commands are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-slow bench bench-setup clean

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

# Side-by-side baselines. antspyx pins numpy<2.4/scipy<1.16 and monai would accept another torch:
# install them without their pins so the project's torch, numpy and scipy stay as they are.
BENCH_DEPS := antspyx==0.6.3 itk-elastix==0.25.4 itk==5.4.7 itk-core==5.4.7 itk-filtering==5.4.7 \
	itk-io==5.4.7 itk-numerics==5.4.7 itk-registration==5.4.7 itk-segmentation==5.4.7 monai==1.6.1
bench-setup: $(STAMP)
	$(PIP) install -q --no-deps $(BENCH_DEPS)
	$(PIP) install -q pandas statsmodels scikit-learn webcolors requests psutil

bench: bench-setup
	$(PY) benchmarks/bench_warp.py --threads 2
	$(PY) benchmarks/bench_losses.py
	$(PY) benchmarks/bench_register.py --threads 2 --dataset vxm --preset fast

clean:
	rm -rf $(VENV) demo_out build dist src/*.egg-info
