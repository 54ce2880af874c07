# Two commands on a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
STAMP := .make/installed
TEST_STAMP := .make/installed-test
# Rebuild the package (and its fused-loss extension) when any of these change.
INSTALL_INPUTS := setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h csrc/*.cuh) tools/install_system_deps.sh

.PHONY: install install-test demo test test-fast clean

install: $(STAMP)

# The package and its extension; the demo needs nothing more.
$(STAMP): $(INSTALL_INPUTS)
	bash tools/install_system_deps.sh
	@$(PYTHON) -c "import torch, torchvision" 2>/dev/null || $(PIP) install "torch>=2.4" "torchvision>=0.19"
	$(PIP) install --no-build-isolation -e .
	@mkdir -p $(dir $(STAMP)) && touch $(STAMP)

# Tests also exercise the optional backends (FFCV, DALI in CPU mode) and timm loading.
install-test: $(TEST_STAMP)

$(TEST_STAMP): $(STAMP)
	$(PIP) install --no-build-isolation -e ".[test]"
	@touch $(TEST_STAMP)

# Trains demo_cpu.yaml, then shows what was learned: k-NN on held-out demo images, the
# trained teacher next to the same network at its random initialisation. The script
# prints each command it runs and writes runs/demo/summary.json.
demo: install
	$(PYTHON) tools/run_demo.py

# One pytest worker per core; worksteal keeps both busy while a slow build or subprocess test
# holds one of them.
test: install-test
	$(PYTHON) -m pytest -q -n auto --dist worksteal

test-fast: install-test
	$(PYTHON) -m pytest -q -n auto --dist worksteal -m "not slow"

clean:
	rm -rf build .make carp_fast/_C*.so *.egg-info
