# The two commands of the README, and the pieces they are made of.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: serve test install install-dev lint unit simulate bench evaluate soak clean

serve: install  ## install, then run the API and one worker node (embedded PostgreSQL without DATABASE_URL)
	$(BIN)/taskqueue serve

test: install-dev lint  ## install with test tools, then run every check and the test suite
	$(BIN)/pytest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	@# The admin browser test drives Debian's chromium (it skips without it); installed as root where apt exists.
	@if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "chromium not installed: the admin browser test will skip"; fi

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

simulate: install  ## every scenario through the simulator, charts into sim-out/
	$(BIN)/simulate scenarios/*.yaml --out sim-out

evaluate: install-dev  ## regenerate evaluation_results.md from real runs (peers and locust included)
	$(BIN)/pip install --quiet -e ".[dev,peers,load]"
	$(BIN)/python -m loadtest.evaluate

bench: install-dev  ## benchmarks (not part of the test run)
	$(BIN)/python -m loadtest.bench_simulator
	$(BIN)/python -m loadtest.bench_service

soak: install-dev  ## 30 minutes of mixed traffic with a worker kill -9 every minute; PASS only if nothing is lost or run twice
	$(BIN)/python -m loadtest.soak --minutes 30

clean:
	rm -rf $(VENV) sim-out .pytest_cache .mypy_cache .ruff_cache
