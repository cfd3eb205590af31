# Entry points a newcomer needs. Every target sets up first (fast when already done).
PY := .venv/bin/python

.PHONY: setup run test lint format

setup:
	bash scripts/setup.sh

# The main job. Until the server lands it prepares the default model and checks every
# shipped delta against it.
run: setup
	.venv/bin/vsp model info
	@set -e; for f in deltas/*/*.safetensors; do [ -e "$$f" ] || continue; .venv/bin/vsp verify "$$f"; done

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: lint
	$(PY) -m pytest -q
