# `make demo` and `make test` work on a fresh clone: they create .venv, install dgss
# with its extras (torch, torchvision and timm from the package index), then run.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test install wheel clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dgss demo

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile

# the wheel `pip install dgss-*.whl` installs (configs and assets inside; tests/test_packaging.py checks it)
wheel: $(STAMP)
	$(PY) -m pip wheel --no-deps --no-build-isolation --quiet . -w dist

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
