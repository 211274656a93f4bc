# One target per thing a person does: install, test, demo, bench.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
# -march of the CPU kernel (hgloss/backends/_build.py): empty for the portable x86-64 baseline,
# `native` (or x86-64-v3) for a faster build for this machine: make install HGLOSS_CPU_ARCH=native
HGLOSS_CPU_ARCH ?=
export HGLOSS_CPU_ARCH
CMAKE_BUILD := build/cmake
# The stamp is named after TORCH_SPEC and HGLOSS_CPU_ARCH, so that changing either reinstalls
# (and changing it back does too: an install removes the other stamps).
INSTALL_KEY := $(shell printf '%s|%s' '$(TORCH_SPEC)' '$(HGLOSS_CPU_ARCH)' | sha1sum | cut -c1-12)
STAMP := $(VENV)/.hgloss-installed-$(INSTALL_KEY)
BUILD_INPUTS := setup.py pyproject.toml requirements-dev.txt Makefile hgloss/backends/_build.py \
	$(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install test test-python test-cpp demo bench clean

install: $(STAMP)

# Rebuilt when the dependencies, the build settings or the C++/CUDA sources change.
$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements-dev.txt
	# hgloss.mmpose's tests: mmpose and the parts of its stack that import without mmcv's compiled
	# ops (requirements-dev.txt pins their small dependencies); xtcocotools from source, since its
	# wheels are built against numpy 1.x
	$(PIP) install --quiet --no-deps mmengine==0.10.7 mmcv-lite==2.1.0 mmdet==3.3.0 mmpose==1.3.2
	$(PIP) install --quiet --no-deps --no-build-isolation --no-binary xtcocotools xtcocotools==1.14.3
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import hgloss; print('hgloss', hgloss.__version__, 'backends:', hgloss.available_backends())"
	rm -f $(VENV)/.hgloss-installed*
	touch $(STAMP)

test: install test-cpp test-python

test-python: install
	$(PY) -m pytest tests

test-cpp:
	cmake -S . -B $(CMAKE_BUILD) -DCMAKE_BUILD_TYPE=Release
	cmake --build $(CMAKE_BUILD) -j 2
	ctest --test-dir $(CMAKE_BUILD) --output-on-failure

# Trains on the built-in synthetic set (hg+sd), evaluates with COCOeval and prints the AP; the
# output folder, runs/demo, holds the metrics, plots and checkpoints. `examples/demo.py` shows
# the loss alone.
demo: install
	$(PY) examples/train_pose.py --config examples/configs/synthetic.yaml --out runs/demo

# Writes to a new folder, benchmarks/results/local/<date-time>/ (.gitignore'd); the committed
# results in benchmarks/results/<device>/ are rewritten only with UPDATE_RESULTS=1.
ifndef BENCH_OUT
BENCH_OUT := benchmarks/results/local/$(shell date +%Y%m%d-%H%M%S)
endif
ifeq ($(UPDATE_RESULTS),1)
BENCH_OUT_ARG :=
else
BENCH_OUT_ARG := --out $(BENCH_OUT)
endif

bench: install
ifneq ($(UPDATE_RESULTS),1)
	mkdir -p $(BENCH_OUT)
endif
	$(PY) benchmarks/bench_loss.py --batch 8,32,64,128 $(BENCH_OUT_ARG)
	$(PY) benchmarks/bench_train_step.py $(BENCH_OUT_ARG)
	$(PY) benchmarks/bench_keypoint_targets.py $(if $(BENCH_OUT_ARG),--out $(BENCH_OUT)/keypoint_targets)

clean:
	rm -rf build dist $(VENV) *.egg-info hgloss/_C*.so
