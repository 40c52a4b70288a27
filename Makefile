# The two commands a newcomer runs are `make demo` and `make test`; both install what they need.
# Debian 12: nbdkit embeds /usr/bin/python3, and libnbd's Python module exists only there, so the venv
# is made from that interpreter with --system-site-packages.

DEB_PACKAGES := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-utils qemu-system-common \
                fio python3-venv python3-prometheus-client
# Real clients (tests/test_guest.py): QEMU, a Debian kernel, and what the guest's initramfs holds
# (busybox, mkfs.ext4, nbd-client); e2fsck/debugfs check its file system; psktool and openssl make
# the TLS tests' keys. Installed without recommends: qemu-system-x86 would bring a desktop.
GUEST_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static nbd-client e2fsprogs gnutls-bin openssl
# Ceph (tests/lib/ceph.py: a one-node cluster without systemd, for tests/test_ceph.py and the remote
# bench), and QEMU's rbd driver, which mirrorfs's storage daemons use for rbd: SOURCE and DEST.
# Without recommends: ceph-mgr's would bring the dashboard and its Python stack.
CEPH_PACKAGES := ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra
# `mirrorfs metrics` is scraped by a real Prometheus in tests/test_host_metrics.py (started by the test
# on loopback, never as a service). Without recommends: they would bring node-exporter and its
# collectors.
PROMETHEUS_PACKAGES := prometheus
# A real libvirtd (tests/test_libvirt.py: session mode, its own directories, TCG): the daemon's QEMU
# driver and virsh. Without recommends: they would bring dnsmasq, firewall and storage backends.
LIBVIRT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
VENV := .venv
PREFIX ?= /opt/mirrorfs
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/mirrorfs
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup lint test demo bench clean install

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@missing() { for p in "$$@"; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done; }; \
	main=$$(missing $(DEB_PACKAGES)); norec=$$(missing $(GUEST_PACKAGES) $(CEPH_PACKAGES) $(PROMETHEUS_PACKAGES) \
	    $(LIBVIRT_PACKAGES)); \
	if [ -n "$$main$$norec" ]; then \
	    echo "installing Debian packages:" $$main $$norec; \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -q || exit 1; \
	    if [ -n "$$main" ]; then \
	        DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$main || exit 1; fi; \
	    if [ -n "$$norec" ]; then DEBIAN_FRONTEND=noninteractive \
	        $$SUDO apt-get install -y -q --no-install-recommends $$norec || exit 1; fi; \
	fi
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -c 'import nbd, mirrorfs, prometheus_client'
	touch $@

# ruff (pyflakes and pycodestyle; the rules and per-file exceptions are in pyproject.toml).
lint: setup
	$(VENV)/bin/ruff check mirrorfs plugin tests scripts

# MIRRORFS_SUITE=full: tests/conftest.py fails the run if a marker group of the suite (the real
# guests) is deselected or ran nothing; MIRRORFS_ALLOW_PARTIAL=1 allows a partial run on purpose.
test: lint
	MIRRORFS_SUITE=full $(PY) -m pytest $(PYTEST_ARGS)

# The package in its own venv where docs/systemd's units point (PREFIX, default /opt/mirrorfs), and
# the units in UNITDIR (default /etc/systemd/system): scripts/install.sh says how.
install:
	PREFIX=$(PREFIX) UNITDIR=$(UNITDIR) CONFDIR=$(CONFDIR) sh scripts/install.sh

demo: setup
	$(PY) scripts/demo.py

bench: setup
	$(PY) scripts/bench.py $(BENCH_ARGS)
	$(PY) scripts/bench_remote.py $(BENCH_REMOTE_ARGS)
	$(PY) scripts/bench_lifecycle.py $(BENCH_LIFECYCLE_ARGS)
	$(PY) scripts/bench_evacuate.py $(BENCH_EVACUATE_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
