# The two commands a user needs: `make run` (the main GRPO job) and `make test`.
# Both install what they need first (scripts/setup.sh), so a fresh machine needs nothing else.
PYTHON ?= python3
ARGS ?=

.PHONY: setup run test lint

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh test,hf

run: setup
	$(PYTHON) -m asyncflow.cli run grpo $(ARGS)

test:
	PYTHON=$(PYTHON) bash .ci/run

lint: setup
	$(PYTHON) -m ruff check . && $(PYTHON) -m ruff format --check .
