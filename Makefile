# Entry points a newcomer needs. Every target sets up first (fast when already done).
PY := .venv/bin/python

.PHONY: setup test-tools run test lint format deltas

setup:
	bash scripts/setup.sh

# What the tests need besides .venv: Debian's Prometheus where it is missing (apt-get).
test-tools:
	bash scripts/test-tools.sh

# The main job: serve the default model with the shipped 'all' delta merged at load time
# (vLLM's OpenAI-compatible server on 127.0.0.1:8000; admin token from VSP_ADMIN_TOKEN).
run: setup
	.venv/bin/vsp serve

lint: setup
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format:
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The README's test command and CI's (.ci/run): sets up everything the tests need first.
test: lint test-tools
	$(PY) -m pytest -q

# Regenerate the shipped deltas of the default model from deltas/solve.toml (all),
# deltas/solve-groups.toml and deltas/solve-polyrefuse.toml (each names the groups it makes),
# measure them on held-out rows (figures go into each manifest) and print the effect tables
# for the README.
# vsp solve refuses to replace shipped deltas unless told to: --overwrite-shipped.
DELTA_DIR := deltas/qwen2.5-coder-0.5b-instruct
deltas: setup
	.venv/bin/vsp solve --config deltas/solve.toml --out $(DELTA_DIR) --overwrite-shipped
	.venv/bin/vsp solve --config deltas/solve-groups.toml --out $(DELTA_DIR) --overwrite-shipped
	.venv/bin/vsp solve --config deltas/solve-polyrefuse.toml --out $(DELTA_DIR) --overwrite-shipped
	.venv/bin/vsp measure $(DELTA_DIR)/*.safetensors --samples build/samples
	$(PY) -m vllm_safety_patch.eval.effect_table $(DELTA_DIR)
