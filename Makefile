# Two entry points: `make demo` runs the main job, `make test` sets up and runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

$(BIN)/vqtool: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	touch $@

install: $(BIN)/vqtool

demo: install
	$(BIN)/vqtool quickstart --run runs/quickstart

test: install
	$(BIN)/ruff check vqtool tests benchmarks
	$(BIN)/pytest

clean:
	rm -rf $(VENV) runs .pytest_cache
