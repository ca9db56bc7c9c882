# Two entry points: `make demo` (the embedded CPU demo) and `make test` (the whole suite).
# Both create .venv/ in the repository root with the known-good set in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/sequencer demo

test: $(STAMP)
	$(BIN)/sequencer build-kernel
	$(BIN)/python -m pytest tests

clean:
	rm -rf $(VENV) build *.egg-info
