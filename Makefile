# Every target sets up what it needs: a fresh clone runs `make test` or `make run` as is.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: test lint browser run demo bench soak clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

lint: $(STAMP)
	$(BIN)/ruff check writebehind tests benchmarks
	$(BIN)/ruff format --check writebehind tests benchmarks
	$(BIN)/mypy --strict writebehind

# Headless Chromium for the browser test, from Debian's packages (browsers that download
# themselves cannot be fetched here).
browser:
	command -v chromium >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

# The suite under coverage, child processes included (see [tool.coverage.run]); fails below
# 90 % of lines or 85 % of branches. The report and build/coverage/coverage.json say where.
test: lint browser
	$(BIN)/coverage erase
	$(BIN)/coverage run -m pytest -q
	$(BIN)/coverage combine --quiet
	$(BIN)/coverage report
	$(BIN)/coverage json --quiet
	$(BIN)/python tests/coverage_gate.py build/coverage/coverage.json --lines 90 --branches 85

# The main job: the chat server on http://127.0.0.1:8000/ (CHAT_SERVER_HOST and
# CHAT_SERVER_PORT change it) over ./chat_sessions.db. It installs only what it runs (the
# server extra), prints where it listens and the demo token, then only warnings and
# errors; Ctrl-C (or SIGTERM) ends the open streams, flushes everything and stops.
SERVER_STAMP := $(VENV)/.installed-server
$(SERVER_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing writebehind[server] into $(VENV)"
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[server]'
	@touch $@

run: $(SERVER_STAMP)
	@$(BIN)/python -m writebehind.server

# The library alone: a scripted chat on its own file (DEMO_DB, ./demo_sessions.db), apart
# from the web demo's, shut down, reopened, shown. It needs the library only.
DEMO_DB ?= ./demo_sessions.db
CORE_STAMP := $(VENV)/.installed-core
$(CORE_STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check -e .
	@touch $@

demo: $(CORE_STAMP)
	@CHAT_SESSION_DB_PATH=$(DEMO_DB) $(BIN)/python -m writebehind.demo

bench: $(STAMP)
	mkdir -p .benchmarks
	$(BIN)/pytest benchmarks -q --benchmark-only --benchmark-group-by=group \
		--benchmark-columns=min,median,mean,rounds --benchmark-json=.benchmarks/latest.json
	$(BIN)/python benchmarks/report.py .benchmarks/latest.json

# The long runs: 10,000 model histories, 10,000 fuzzed calls, 20 SIGKILL rounds, a
# 5,000-session load. Tens of minutes on 2 cores; not part of `make test`.
soak: $(STAMP)
	WRITEBEHIND_SOAK=1 WRITEBEHIND_CRASH_ROUNDS=20 $(BIN)/pytest -q -s --timeout=0 \
		--hypothesis-show-statistics tests/reliability

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .benchmarks *.egg-info
