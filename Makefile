# The two commands of the README. Both set up .venv first (once; again when the pins change).
#   make book   execute the notebooks with papermill (PROFILE=tiny|cpu, SYNDIFF_DATA=...), build the book
#               BOOK_ARGS passes more to scripts/run_notebooks.py, e.g. BOOK_ARGS="-p reuse_run=true"
#   make test   run every test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
BOOK_ARGS ?=
# Two processes with two OpenMP threads each on two cores spin-wait on each other (a training
# step went from 0.09 s to 3.2 s): let idle OpenMP threads sleep instead.
export OMP_WAIT_POLICY ?= PASSIVE
export TQDM_DISABLE ?= 1

.PHONY: book test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

test: setup
	$(PY) -m pytest -q --durations=15

book: setup
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) $(BOOK_ARGS)
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The book: $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build artifacts .pytest_cache
