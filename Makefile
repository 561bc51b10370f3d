# vfiod — the two commands of the README are `make demo` and `make check`.
# Each does its own set-up on a fresh Debian 12 machine (run as root).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := build/stamps

# Where `make install` puts things. The package and its dependencies go into
# a virtualenv of their own under $(LIBDIR), linked from $(BINDIR); the files
# systemd, dbus-daemon and udev read go where they look for them, whatever
# PREFIX is. DESTDIR stages it all for packaging.
PREFIX ?= /usr
BINDIR ?= $(PREFIX)/bin
LIBDIR ?= $(PREFIX)/lib/vfiod/venv

.PHONY: check demo deps venv test lint unit vm test-kernel clean install install-files install-venv

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
$(STAMP)/venv: setup.cfg pyproject.toml $(STAMP)/deps
	@mkdir -p $(STAMP)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,vm,journal]'
	# libvirt's binding must not be newer than the libvirt it builds against.
	$(PY) -m pip install -q "libvirt-python==$$(pkg-config --modversion libvirt)"
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

install: install-files install-venv

install-files:
	install -Dm644 dbus/org.vfiod1.conf "$(DESTDIR)/usr/share/dbus-1/system.d/org.vfiod1.conf"
	sed 's|@BINDIR@|$(BINDIR)|g' dbus/org.vfiod1.service.in > build-activation.tmp
	install -Dm644 build-activation.tmp "$(DESTDIR)/usr/share/dbus-1/system-services/org.vfiod1.service"
	sed 's|@BINDIR@|$(BINDIR)|g' systemd/vfiod.service.in > build-unit.tmp
	install -Dm644 build-unit.tmp "$(DESTDIR)/usr/lib/systemd/system/vfiod.service"
	rm -f build-activation.tmp build-unit.tmp
	install -Dm644 systemd/vfiod.tmpfiles "$(DESTDIR)/usr/lib/tmpfiles.d/vfiod.conf"
	install -Dm644 systemd/70-vfiod.rules "$(DESTDIR)/usr/lib/udev/rules.d/70-vfiod.rules"
	install -Dm644 systemd/vfiod-modules.conf "$(DESTDIR)/usr/lib/modules-load.d/vfiod.conf"
	install -Dm644 policy/vfiod.toml "$(DESTDIR)/usr/lib/vfiod/vfiod.toml"
	install -Dm644 polkit/org.vfiod1.policy "$(DESTDIR)/usr/share/polkit-1/actions/org.vfiod1.policy"
	install -Dm755 hooks/libvirt-qemu "$(DESTDIR)/usr/lib/vfiod/libvirt-qemu-hook"
	install -d -m755 "$(DESTDIR)/usr/lib/vfiod/policy.d" "$(DESTDIR)/etc/vfiod/policy.d"
	install -Dm644 -t "$(DESTDIR)/usr/share/doc/vfiod" policy/README.md
	install -Dm644 -t "$(DESTDIR)/usr/share/doc/vfiod/examples" policy/examples/*.toml polkit/examples/*.rules

install-venv:
	"$(PYTHON)" -m venv "$(DESTDIR)$(LIBDIR)"
	"$(DESTDIR)$(LIBDIR)/bin/python" -m pip install -q --upgrade pip
	"$(DESTDIR)$(LIBDIR)/bin/python" -m pip install -q '.[journal]'
	# For `vfioctl attach --libvirt`, where libvirt's headers are there to build it.
	if pkg-config --exists libvirt; then \
		"$(DESTDIR)$(LIBDIR)/bin/python" -m pip install -q "libvirt-python==$$(pkg-config --modversion libvirt)"; \
	fi
	# Scripts name their interpreter by its staged path: name the installed one
	# (on line 1, or line 2 of pip's sh trampoline for a path with a space).
	sed -i '1,3s|$(DESTDIR)/|/|' "$(DESTDIR)$(LIBDIR)/bin/vfiod" "$(DESTDIR)$(LIBDIR)/bin/vfioctl"
	install -d -m755 "$(DESTDIR)$(BINDIR)"
	ln -sfn $(LIBDIR)/bin/vfiod "$(DESTDIR)$(BINDIR)/vfiod"
	ln -sfn $(LIBDIR)/bin/vfioctl "$(DESTDIR)$(BINDIR)/vfioctl"

clean:
	rm -rf build $(VENV) *.egg-info
