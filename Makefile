# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch is pinned here, not in constraints.txt (default: the CPU build on disk), so a GPU machine can choose its
# own: `make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"`. Without TORCH on
# the command line, a CUDA torch already in .venv is kept. pyproject.toml asks only for torch>=2.3.
TORCH  ?= torch==2.13.0
# torch and the packages only torch needs: left out of constraints.txt so another torch build can bring its own.
TORCH_ONLY := torch|triton|nvidia-.*|sympy|mpmath|filelock|fsspec|jinja2|markupsafe|setuptools

.PHONY: install constraints test demo bench goldens clean

install: $(STAMP)

# Every other dependency is pinned by constraints.txt (frozen from a green `make test` by `make constraints`).
# The stamp depends on this Makefile too, so a changed pin or install step reinstalls.
$(STAMP): pyproject.toml constraints.txt Makefile
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' is missing or older than Python 3.10, which autoseg needs;" \
	       "install Python 3.10+ and run: make install PYTHON=python3.11" >&2; exit 1; }
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { \
	  echo "error: '$(PYTHON)' has no working venv module (ensurepip is missing); install it" \
	       "(Debian/Ubuntu: apt install python3-venv) and rerun make install" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ "$(origin TORCH)" != "command line" ] && \
	    $(PY) -c 'import sys, torch; sys.exit(not torch.version.cuda)' 2>/dev/null; then \
	  echo "keeping the CUDA torch already in $(VENV) (pass TORCH=... to replace it)"; \
	elif [ -n "$(strip $(TORCH))" ]; then \
	  echo "$(PY) -m pip install -q $(TORCH)"; $(PY) -m pip install -q $(TORCH); \
	fi
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

# After a green `make test`: pin every installed dependency except torch and what only torch needs.
constraints: install
	$(PY) -m pip freeze --exclude-editable | grep -v -i -E '^($(TORCH_ONLY))==' > constraints.txt

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
