# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install test demo bench goldens clean

install: $(STAMP)

# torch is pinned here (CPU build on disk); pyproject keeps torch>=2.3 so a GPU machine can bring its own.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

demo: install
	$(VENV)/bin/autoseg demo

bench: install
	$(PY) benchmarks/run_all.py

# Regenerate the planner's golden plans after an intentional planner change (review the diff!).
goldens: install
	for f in fingerprints/*.json; do \
		case $$f in *schema.json) continue;; esac; \
		$(VENV)/bin/autoseg plan --device gpu -f $$f -o plans/$$(basename $$f); \
	done

clean:
	rm -rf $(VENV) build *.egg-info
