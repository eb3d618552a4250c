# kbench: `make demo`, `make test`. Both set up .venv first when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BACKENDS ?= jax tensorflow torch
PYTEST_ARGS ?=

.PHONY: install demo test test-slow gpu-check overhead clean

install:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,export]'
	@touch $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(MAKE) install

# The main job on data that needs no download: a short CIFAR ResNet run per backend, then
# the cross-backend comparison with its defaults.
demo: $(VENV)/.installed
	@for b in $(BACKENDS); do \
	  echo "=== demo: recipes/cifar_resnet.py under KERAS_BACKEND=$$b ==="; \
	  KERAS_BACKEND=$$b $(PY) recipes/cifar_resnet.py --dataset synthetic --model resnet20 \
	    --epochs 2 --steps-per-epoch 20 --batch-size 64 --output-dir runs/demo/$$b || exit 1; \
	done
	@echo "=== demo: kbench compare (defaults: ResNet-20, synthetic data, every installed backend) ==="
	@rm -rf runs/demo/compare  # the last demo's: compare refuses a folder that holds results
	$(VENV)/bin/kbench compare --output runs/demo/compare

# The whole suite once per backend: KERAS_BACKEND is read once per interpreter. Each pass
# prints its 15 slowest tests and how long it took. Tests marked `slow` are left out: each
# repeats, at more cost, what a test that stays checks (`make test-slow` runs them).
# Each pass runs its test files on TEST_WORKERS pytest-xdist workers (a file stays on one worker,
# so its module fixtures are built once): much of a test's time is one core importing, tracing
# or compiling, so two workers side by side took 0.6-0.7x the time on this 2-core machine.
# OMP_WAIT_POLICY=PASSIVE (unless already set) because two workers oversubscribe the cores: torch's
# OpenMP threads otherwise spin at every barrier waiting for a thread that is not running, and
# single torch tests ran 10-30x slower (docs/development.md, "Running the tests"). It changes how
# idle threads wait, not what they compute. TEST_WORKERS=0 runs a pass as plain pytest.
# --no-loadscope-reorder: files are handed out heaviest first, in the order tests/conftest.py
# sorts them (FILE_CPU_SECONDS), not by how many tests each holds.
TEST_MARKS ?= not slow
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	@case "$(TEST_WORKERS)" in ''|*[!0-9]*) echo "error: TEST_WORKERS=$(TEST_WORKERS) is not" \
	  "allowed: it takes a number of pytest workers >= 0 (0: plain pytest)" >&2; exit 2;; esac
	@for b in $(BACKENDS); do \
	  echo "=== pytest under KERAS_BACKEND=$$b ($(TEST_WORKERS) workers) ==="; start=$$(date +%s); \
	  OMP_WAIT_POLICY=$${OMP_WAIT_POLICY:-PASSIVE} KERAS_BACKEND=$$b $(PY) -m pytest -q \
	    --durations=15 -m "$(TEST_MARKS)" -n $(TEST_WORKERS) --dist loadfile \
	    --no-loadscope-reorder $(PYTEST_ARGS) \
	    || exit 1; \
	  echo "=== $$b pass: $$(( $$(date +%s) - start )) s ==="; \
	done; echo "=== all backends passed: $(BACKENDS) ==="

# Only the tests `make test` leaves out, once per backend.
test-slow:
	@$(MAKE) --no-print-directory test TEST_MARKS=slow

# The first look at an NVIDIA GPU (docs/compare.md, "GPU"): every backend and native twin
# at float32 and mixed_bfloat16, with TFLOP/s and MFU. Installs nothing (the GPU machine's
# interpreter runs it when there is no .venv); without a GPU it says so in one line, exit 0.
GPU_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	@$(GPU_PY) tools/gpu_check.py $(GPU_CHECK_ARGS)

# Host overhead per step (docs/compare.md, "Host overhead"): every backend and twin at
# ResNet-20, batch 2, compiled and not, and a layer profile of Keras-torch. CPU is enough.
OVERHEAD_ARGS ?=
overhead: $(VENV)/.installed
	$(PY) tools/overhead.py $(OVERHEAD_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
