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

test: lint browser
	$(BIN)/pytest -q

# The main job: the chat server on http://127.0.0.1:8000/ over ./chat_sessions.db.
# It prints the demo token; Ctrl-C (or SIGTERM) flushes everything and stops.
run: $(STAMP)
	$(BIN)/python -m writebehind.server --host 127.0.0.1 --port 8000

# The library alone: a scripted chat on ./chat_sessions.db, shut down, reopened, shown.
demo: $(STAMP)
	$(BIN)/python -m writebehind.demo

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
