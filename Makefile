# vfiod — the two commands of the README are `make demo` and `make check`.
# Each does its own set-up on a fresh Debian 12 machine (run as root).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := build/stamps

.PHONY: check demo deps venv test lint unit vm test-kernel clean

# Everything, as one pytest run: linters and mypy (tests/test_lint.py), unit
# tests, and the VM tests on real kernels.
check: deps venv test

# Debian packages the tests need: QEMU >= 9 (from bookworm-backports) and a
# stock kernel for the VM tests, dbus for the bus tests, libsystemd-dev and
# pkg-config to build systemd-python.
deps: $(STAMP)/deps
$(STAMP)/deps: scripts/install-deps.sh
	scripts/install-deps.sh
	@mkdir -p $(STAMP)
	@touch $@

# The project's virtualenv with the package (editable) and its test and VM extras.
venv: $(STAMP)/venv
$(STAMP)/venv: setup.cfg pyproject.toml | $(STAMP)/deps
	@mkdir -p $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,vm,journal]'
	@touch $@

test: venv deps
	$(PY) -m pytest -v tests

# Parts of `test`, for working on one layer.
lint: venv
	$(PY) -m pytest tests/test_lint.py

unit: venv
	$(PY) -m pytest -m 'not vm' tests

vm: venv deps
	$(PY) -m pytest -m vm -v tests

# Build the no-IOMMU/iommufd test kernel from Debian's linux-source-6.12 when
# there is none beside the checkout (about 20 minutes on 2 cores; cached).
test-kernel: deps
	tests/vm/build-kernel.sh

demo: deps venv
	$(PY) -m tests.vm.demo

clean:
	rm -rf build $(VENV) *.egg-info
