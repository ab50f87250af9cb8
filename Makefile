# Every target does its own set-up: a machine with only Python 3.11 and pip is enough.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0

.PHONY: install test test-data lint demo bench clean

$(VENV)/.installed: pyproject.toml
	# Headless Chromium + ChromeDriver for the browser tests, a CJK font for attention maps of
	# Chinese text, and g++ for torch.compile's CPU kernels (train.compile and its test)
	# (Debian packages; needs root, as in CI).
	command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	  && command -v g++ >/dev/null && fc-list :lang=zh | grep -q . \
	  || (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
	      chromium chromium-driver fonts-wqy-zenhei g++)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q

# The tests that need real datasets: set TFORMER_DATA_DIR to a mirror (`tformer data`) first.
test-data: install
	@test -n "$$TFORMER_DATA_DIR" || (echo "set TFORMER_DATA_DIR to a mirror (tformer data)"; exit 2)
	$(PY) -m pytest -q -m mirror

# Train a small model on the embedded docstring corpus (no download), <= 10 min on 2 cores.
demo: install
	$(VENV)/bin/tformer demo recipes/demo.yaml

# ruff, then the layer order of DESIGN.md (tests/test_architecture.py: dependencies point down,
# no import circles, every function-local import says why; `make test` runs it too).
lint: install
	$(VENV)/bin/ruff check src tests bench examples
	$(PY) -m pytest -q tests/test_architecture.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache runs
