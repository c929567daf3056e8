# Two commands do all the set-up on a fresh machine (Python 3.11 + pip):
#   make demo   the main job on the embedded synthetic world
#   make test   the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo

.PHONY: demo test lint clean

# torch: the CPU build of exactly this version first; an open range would pull CUDA wheels
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ctrserve demo --out $(DEMO_DIR) $(DEMO_FLAGS)

# the suite runs in a random order (pytest-randomly) on TEST_WORKERS processes (pytest-xdist);
# the order's seed is printed first: `make test SEED=N` runs that order again
TEST_WORKERS ?= 2
ifndef SEED
SEED := $(shell od -An -N4 -tu4 /dev/urandom | tr -d ' ')
endif
test: $(STAMP)
	$(BIN)/ruff check .
	@echo "test order: --randomly-seed=$(SEED) (make test SEED=$(SEED) repeats it)"
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) -p randomly --randomly-seed=$(SEED)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_DIR)
