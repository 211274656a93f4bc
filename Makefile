# One target per thing a person does: install, test, demo, bench.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH_SPEC ?= torch==2.13.0
CMAKE_BUILD := build/cmake
STAMP := $(VENV)/.hgloss-installed
BUILD_INPUTS := setup.py pyproject.toml requirements-dev.txt Makefile \
	$(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')

.PHONY: install test test-python test-cpp demo bench clean

install: $(STAMP)

# Rebuilt only when the dependencies or the C++/CUDA sources change.
$(STAMP): $(BUILD_INPUTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet -r requirements-dev.txt
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	$(PY) -c "import hgloss; print('hgloss', hgloss.__version__, 'backends:', hgloss.available_backends())"
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

bench: install
	$(PY) benchmarks/bench_loss.py --batch 8,32,64,128
	$(PY) benchmarks/bench_train_step.py

clean:
	rm -rf build $(VENV) *.egg-info hgloss/_C*.so
