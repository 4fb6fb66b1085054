# Set-up and the two README commands. Everything lives in .venv/ at the repository root.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
# ONNX Runtime wheel: the GPU build where an NVIDIA driver is visible, else the small CPU build.
ORT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
WORKDIR ?= runs/demo
PYTEST_ARGS ?=

.PHONY: install browser demo test test-fast clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[test,$(ORT)]"
	touch $@

# The main job end to end on embedded defaults.
demo: install
	$(BIN)/amad run --config tune_configs/default.yaml --workdir $(WORKDIR)

# Headless Chromium for the demo page's browser test: Debian's chromium and chromium-driver, installed
# when missing and this runs as root with apt-get; otherwise that one test is skipped (and says why).
browser:
	@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium and chromium-driver (the demo page's browser test)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null; \
	else echo "no /usr/bin/chromium + /usr/bin/chromedriver and no root apt-get: the browser test will be skipped"; fi

# The whole test suite (unit + integration).
test: install browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Unit tests only (no Ray cluster, no servers).
test-fast: install
	$(BIN)/python -m pytest -m "not integration and not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache
