# Set-up and the two entry points: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make test TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" EXTRAS=dev,gpu
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev
# pytest-xdist workers for `make test` (tests sharing a costly fixture stay on one worker: tests/conftest.py)
TEST_WORKERS ?= 2
comma := ,
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(subst $(comma),-,$(EXTRAS))

.PHONY: install test lint demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first: installing the rest into a venv without torch pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python setup.cfg pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

install: $(STAMP)

test: install
	$(BIN)/python -m pytest -n $(TEST_WORKERS)

lint: install
	$(BIN)/ruff check .

demo: install
	$(BIN)/regionmed-demo --output-dir outputs/demo

clean:
	rm -rf $(VENV) outputs build *.egg-info .pytest_cache
