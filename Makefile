# callsentry: the commands README.md promises. Everything runs from .venv.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: setup demo serve test lint format bench soak clean wheel install

setup: $(STAMP)

# The detection's hot path is compiled by mypyc from these sources (setup.py,
# engine.detect.COMPILED).
COMPILED := $(foreach m,windows calls fields aggregates evaluate pipeline conduct,engine/detect/$(m).py) \
	models/caller_state.py models/menu_traffic.py

$(STAMP): pyproject.toml setup.py $(wildcard engine/ingest/_*.c) $(COMPILED)
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "callsentry needs Python 3.11 or newer")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	@echo "compiling the detection with mypyc (a few minutes)"
	$(BIN)/pip install --quiet --no-build-isolation --no-deps -e .
	@# Bytecode for the sources, as pip writes it for an installed wheel: without it a
	@# process started where PYTHONDONTWRITEBYTECODE is set (containers often set it)
	@# compiles every module it imports, each time (bench/README.md, "Process weight").
	$(BIN)/python -m compileall -q engine models
	@touch $@

# A wheel for production (dist/): compiled as `make setup` compiles (with the venv's
# mypy), the shipped rules inside, no development tools in it or in its dependencies.
# Built from a clean build folder, so no file of an older build rides along.
wheel: setup
	rm -rf build/lib* build/bdist* dist
	$(BIN)/pip wheel --quiet --no-deps --no-build-isolation --wheel-dir dist .
	@$(BIN)/python -c "$$WHEEL_PARTS" dist/callsentry-*.whl

# Which compiled parts the wheel holds, said plainly (pip's quiet build does not show it).
define WHEEL_PARTS
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
missing = [] if "engine/detect/_compiled.sha256" in names else ["detection (mypyc)"]
missing += [h for h in ("_fastio", "_seen", "_rows") if not any(n.startswith(f"engine/ingest/{h}.") and n.endswith(".so") for n in names)]
print(sys.argv[1] + ": " + ("all compiled parts in" if not missing else "without compiled parts, which run as Python (slower): " + ", ".join(missing)))
endef
export WHEEL_PARTS

# A production install: its own venv at PREFIX with the wheel and its runtime
# dependencies only (README "Deploying"); then says whether the compiled parts are in.
PREFIX ?= /opt/callsentry
install: wheel
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install --quiet --upgrade pip
	$(PREFIX)/bin/pip install --quiet dist/callsentry-*.whl
	@# The same version built again replaces the one installed (dependencies stay).
	$(PREFIX)/bin/pip install --quiet --force-reinstall --no-deps dist/callsentry-*.whl
	$(PREFIX)/bin/callsentry version

demo: setup
	$(BIN)/python -m engine.apps.demo

serve: setup
	$(BIN)/callsentry serve

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/replay.py --rounds 5
	$(BIN)/python bench/stream.py --rounds 3
	$(BIN)/python bench/detection.py --seeds 10 --default-region CN
	$(BIN)/python bench/detection.py --scenarios data/scenarios --default-region CN
	$(BIN)/python bench/console.py

# Faults at length (kills, loss, a full disk, the fuzz targets' long budgets): more than
# an hour on two cores; the figures go to bench/README.md. SOAK_ARGS passes options
# (`bench/soak.py --help`), e.g. SOAK_ARGS="--fuzz-jobs 4 --fuzz-seconds 900".
SOAK_ARGS ?=
soak: setup
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
