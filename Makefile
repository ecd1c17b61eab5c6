# The two commands of the README. Both set up .venv first (once; again when the pins change).
#   make book      execute the notebooks with papermill into _build/book/ (PROFILE=tiny|cpu, SYNDIFF_DATA=...)
#                  and build the book there; tracked files are never written
#   make test      run every test
# The maintainers' publishing step:
#   make publish   the same, but executes the committed notebooks in place (their outputs are the
#                  published book) and builds the book from the repository
# BOOK_ARGS passes more to scripts/run_notebooks.py, e.g. BOOK_ARGS="-p reuse_run=true"
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= tiny
BOOK_ARGS ?=
BOOK_DIR := _build/book
# Two processes with OpenMP threads on two cores spin-wait on each other and every step
# crawls: let idle OpenMP threads sleep instead.
export OMP_WAIT_POLICY ?= PASSIVE
export TQDM_DISABLE ?= 1

.PHONY: book publish test setup clean

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
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) --out $(BOOK_DIR) $(BOOK_ARGS)
	$(VENV)/bin/jupyter-book build $(BOOK_DIR) -W --keep-going
	@echo "The book: $(CURDIR)/$(BOOK_DIR)/_build/html/index.html"

publish: setup
	$(PY) scripts/run_notebooks.py --profile $(PROFILE) --in-place $(BOOK_ARGS)
	$(VENV)/bin/jupyter-book build . -W --keep-going
	@echo "The published book: $(CURDIR)/_build/html/index.html"

clean:
	rm -rf _build artifacts .pytest_cache
