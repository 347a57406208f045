# Every install step lives here, so a fresh clone needs only `make demo` or `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
DATA   ?= $(if $(FEDBUS_DATA),$(FEDBUS_DATA),../shared/data/pneumoniamnist.npz)
OUT    ?= runs/demo
ENVOYS ?= 5
ROUNDS ?= 20
PYTEST_ARGS ?=

.PHONY: setup system-deps demo test lint format wheel wheel-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these are the releases that lie on the build machines' disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[ml,ui,dev]'
	touch $@

# Mosquitto (the real MQTT broker), systemd-analyze (unit checks) and Chromium (the operator
# page's browser test, driven by Playwright; Playwright's own browser download is not used)
# come from Debian.
system-deps:
	@if ! command -v mosquitto >/dev/null 2>&1 && ! test -x /usr/sbin/mosquitto \
	    || ! command -v systemd-analyze >/dev/null 2>&1 || ! test -x /usr/bin/chromium; then \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q --no-install-recommends mosquitto systemd chromium; \
	fi

demo: setup
	$(VENV)/bin/fedbus demo --envoys $(ENVOYS) --rounds $(ROUNDS) --data $(DATA) --out $(OUT)

test: setup system-deps
	$(PY) -m pytest -q $(PYTEST_ARGS)

# Static checks, before any test runs: lint, formatting, types (pyproject's [tool.mypy]),
# and every import of the shipped packages declared in pyproject.toml (deptry).
lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m deptry .

# The wheel, and a check that it works installed on its own (.ci/wheel_smoke.py).
wheel: setup
	rm -f dist/fedbus-*.whl
	$(PY) -m pip wheel -q --no-deps --wheel-dir dist .

wheel-smoke: wheel
	$(PY) .ci/wheel_smoke.py dist/fedbus-*.whl --data $(DATA)

format: setup
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache .hypothesis build dist
