# The two commands of the README. Both set up .venv on a fresh machine first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/default.py
WORKDIR ?= runs/vgg16_digits
ARGS ?=

.PHONY: install train test mutation-check clean

# `train` needs the package only; `test` adds the peers and servers the tests
# use (PyTorch, Keras, fake-gcs-server, libtpu, JAX's CUDA plugin).
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

# VGG-16 on the built-in digits; re-running resumes from the latest checkpoint.
train: install
	$(PY) -m vgg_flax.train --config=$(CONFIG) --workdir=$(WORKDIR) $(ARGS)

test: $(VENV)/.installed-test
	$(PY) -m pytest -n 2 -q

# The resume tests must tell a resume from a restart: with the trainer's restore
# disabled (tests/mutations/sitecustomize.py) each of them has to fail.
mutation-check: $(VENV)/.installed-test
	VGG_FLAX_MUTATION=no_restore PYTHONPATH=$(CURDIR)/tests/mutations \
	  $(PY) -m pytest -n 2 -q -m resume -p no:cacheprovider

clean:
	rm -rf $(VENV) runs .pytest_cache
