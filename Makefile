# Entry points: `make demo` (the embedded CPU demo), `make test` (the whole suite), `make lint` (ruff) and
# `make package` (build the sdist and wheel, smoke-test the wheel in a fresh virtual environment).
# All create .venv/ in the repository root with the known-good set in constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# `make package`: the wheel goes into a fresh venv that takes the heavy dependencies (torch, timm, ...) from
# .venv's site-packages through a .pth path entry (not processed as a site dir, so .venv's editable install
# of the source tree is not what resolves `sequencer`); installing torch afresh would cost minutes and 6 GB.
DIST := dist
SMOKE := build/package-smoke

.PHONY: install demo test lint package clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/sequencer demo

test: $(STAMP)
	$(BIN)/sequencer build-kernel
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

package: $(STAMP)
	rm -rf $(DIST) $(SMOKE)
	$(BIN)/python -m build --quiet --outdir $(DIST) .
	$(BIN)/python -m venv --without-pip $(SMOKE)/venv
	$(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))' \
		> "$$($(SMOKE)/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/_deps_from_project_venv.pth"
	$(BIN)/python -m pip --python $(SMOKE)/venv/bin/python install --quiet --no-deps --no-index $(DIST)/*.whl
	tmp=$$(mktemp -d) && cd $$tmp \
		&& env -u PYTHONPATH SEQUENCER_CPU_KERNEL=0 TORCH_EXTENSIONS_DIR="$(CURDIR)/$(SMOKE)/ext" \
			"$(CURDIR)/$(SMOKE)/venv/bin/python" -I "$(CURDIR)/tests/test_package.py" "$(CURDIR)" \
		&& env -u PYTHONPATH "$(CURDIR)/$(SMOKE)/venv/bin/sequencer" --help > /dev/null \
		&& echo "sequencer --help: OK (run from $$tmp)"; rc=$$?; rm -rf $$tmp; exit $$rc
	@echo "package: OK: $$(cd $(DIST) && ls)"

clean:
	rm -rf $(VENV) build $(DIST) *.egg-info
