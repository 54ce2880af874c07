# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
# Rebuild the package (and its fused-loss extension) when any of these change.
INSTALL_INPUTS := setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh) tools/install_system_deps.sh

.PHONY: install demo test test-fast bench clean

install: $(STAMP)

$(STAMP): $(INSTALL_INPUTS)
	bash tools/install_system_deps.sh
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install "torch>=2.4" "torchvision>=0.19"
	$(PIP) install --no-build-isolation -e ".[test]"
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

demo: install
	$(PYTHON) -m carp_fast.train --cfg demo_cpu.yaml

test: install
	$(PYTHON) -m pytest -q

test-fast: install
	$(PYTHON) -m pytest -q -m "not slow"

clean:
	rm -rf build .make carp_fast/_C*.so *.egg-info
