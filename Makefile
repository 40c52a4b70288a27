# The two commands a newcomer runs are `make demo` and `make test`; both install what they need.
# `make check` (lint and the unit suite, seconds) is the one to run before every commit.
# Debian 12: nbdkit embeds /usr/bin/python3, and libnbd's Python module exists only there, so the venv
# is made from that interpreter with --system-site-packages.

DEB_PACKAGES := nbdkit nbdkit-plugin-python python3-libnbd libnbd-bin qemu-utils qemu-system-common \
                fio python3-venv python3-prometheus-client
# Real clients (tests/system/test_guest.py): QEMU, a Debian kernel, and what the guest's initramfs holds
# (busybox, mkfs.ext4, nbd-client); e2fsck/debugfs check its file system; psktool and openssl make
# the TLS tests' keys. Installed without recommends: qemu-system-x86 would bring a desktop.
GUEST_PACKAGES := qemu-system-x86 linux-image-amd64 busybox-static nbd-client e2fsprogs gnutls-bin openssl
# Ceph (tests/lib/ceph.py: a one-node cluster without systemd, for tests/system/test_ceph.py and the remote
# bench), and QEMU's rbd driver, which mirrorfs's storage daemons use for rbd: SOURCE and DEST.
# Without recommends: ceph-mgr's would bring the dashboard and its Python stack.
CEPH_PACKAGES := ceph-mon ceph-mgr ceph-osd ceph-common qemu-block-extra
# `mirrorfs metrics` is scraped by a real Prometheus in tests/system/test_host_metrics.py (started by the test
# on loopback, never as a service). Without recommends: they would bring node-exporter and its
# collectors.
PROMETHEUS_PACKAGES := prometheus
# A real libvirtd (tests/system/test_libvirt.py: session mode, its own directories, TCG): the daemon,
# its QEMU driver and virsh. Without recommends: they would bring dnsmasq, firewall and storage backends.
LIBVIRT_PACKAGES := libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
# What the venv alone needs: Debian's Python with venv, and libnbd's module (the data path imports it).
# Enough for `make check` and `make lint`.
PYTHON_PACKAGES := python3-venv python3-libnbd
VENV := .venv
PREFIX ?= /opt/mirrorfs
UNITDIR ?= /etc/systemd/system
CONFDIR ?= /etc/mirrorfs
PY := $(VENV)/bin/python
PYSTAMP := $(VENV)/.python
STAMP := $(VENV)/.installed
# The system suite's parallel pass: its tests mostly wait on processes, so there can be more workers
# than cores; two of them hold the Ceph tests and the guests for most of the pass (their xdist
# groups), the others take the rest (tests/system/conftest.py; docs/TESTING.md has the times).
TEST_WORKERS ?= 4
# Each pass's limit, in seconds (normally ~8 and ~2.5 min): pytest-timeout fails a hung test after
# 15 min (pyproject.toml); these end a pass that hangs anyway (a worker stuck where SIGALRM cannot
# reach), its whole process group, within CI's 90 minutes, as a failed step (status 124).
PARALLEL_LIMIT ?= 2700
SERIAL_LIMIT ?= 1200

.PHONY: setup venv lint check test demo bench clean install

# install_debs(PACKAGES, PACKAGES_WITHOUT_RECOMMENDS): apt-get those not installed yet.
define install_debs
	@missing() { for p in "$$@"; do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q 'install ok installed' || echo $$p; done; }; \
	main=$$(missing $(1)); norec=$$(missing $(2)); \
	if [ -n "$$main$$norec" ]; then \
	    echo "installing Debian packages:" $$main $$norec; \
	    SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	    $$SUDO apt-get update -q || exit 1; \
	    if [ -n "$$main" ]; then \
	        DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q $$main || exit 1; fi; \
	    if [ -n "$$norec" ]; then DEBIAN_FRONTEND=noninteractive \
	        $$SUDO apt-get install -y -q --no-install-recommends $$norec || exit 1; fi; \
	fi
endef

setup: $(STAMP)

venv: $(PYSTAMP)

$(PYSTAMP): pyproject.toml Makefile
	$(call install_debs,$(PYTHON_PACKAGES),)
	test -x $(PY) || /usr/bin/python3 -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[test]'
	$(PY) -c 'import nbd, mirrorfs'
	touch $@

$(STAMP): $(PYSTAMP)
	$(call install_debs,$(DEB_PACKAGES),$(GUEST_PACKAGES) $(CEPH_PACKAGES) $(PROMETHEUS_PACKAGES) \
	    $(LIBVIRT_PACKAGES))
	$(PY) -c 'import prometheus_client'
	touch $@

# ruff (pyflakes and pycodestyle; the rules and per-file exceptions are in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check mirrorfs plugin tests scripts

# Before every commit: lint and the unit suite (tests/unit/: in process, no QEMU, nbdkit or Ceph).
check: lint
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# Lint, the unit suite, then the system suite in two passes: on $(TEST_WORKERS) workers what does
# not measure time (--dist loadgroup: the Ceph tests share one worker and its one cluster), then
# one at a time what does (marker `serial`), after a sync: the parallel pass leaves gigabytes of dirty
# pages whose writeback slowed the first rate test's copies below its budget. Every step runs; any failure fails `make test`. A step
# that PYTEST_ARGS leaves without a test (pytest's exit status 5) is not one, unless none ran.
# MIRRORFS_SUITE=full: tests/system/conftest.py fails the run if a marker group of the suite (the
# real guests) is deselected or ran nothing; MIRRORFS_ALLOW_PARTIAL=1 allows a partial run on purpose.
test: lint setup
	@failed=0; ran=0; \
	step() { echo "make test: $$*"; "$$@"; s=$$?; \
	    if [ $$s -ne 5 ]; then ran=1; fi; \
	    if [ $$s -ne 0 ] && [ $$s -ne 5 ]; then failed=1; echo "make test: that step failed ($$s)"; fi; }; \
	step $(PY) -m pytest tests/unit $(PYTEST_ARGS); \
	step timeout -k 60 $(PARALLEL_LIMIT) env MIRRORFS_SUITE=full \
	    $(PY) -m pytest tests/system --pass=parallel -n $(TEST_WORKERS) --dist loadgroup $(PYTEST_ARGS); \
	sync; \
	step timeout -k 60 $(SERIAL_LIMIT) env MIRRORFS_SUITE=full \
	    $(PY) -m pytest tests/system --pass=serial -p no:xdist $(PYTEST_ARGS); \
	if [ $$ran -eq 0 ]; then echo "make test: no test ran"; exit 1; fi; \
	exit $$failed

# The package in its own venv where docs/systemd's units point (PREFIX, default /opt/mirrorfs), and
# the units in UNITDIR (default /etc/systemd/system): scripts/install.sh says how.
install:
	PREFIX=$(PREFIX) UNITDIR=$(UNITDIR) CONFDIR=$(CONFDIR) sh scripts/install.sh

demo: setup
	$(PY) scripts/demo.py

# The benchmarks are a package (scripts/bench/), run as modules from here.
bench: setup
	$(PY) -m scripts.bench $(BENCH_ARGS)
	$(PY) -m scripts.bench.remote $(BENCH_REMOTE_ARGS)
	$(PY) -m scripts.bench.lifecycle $(BENCH_LIFECYCLE_ARGS)
	$(PY) -m scripts.bench.evacuate $(BENCH_EVACUATE_ARGS)
	$(PY) -m scripts.bench.lag $(BENCH_LAG_ARGS)
	$(PY) -m scripts.bench.group $(BENCH_GROUP_ARGS)
	$(PY) -m scripts.bench.named $(BENCH_NAMED_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
