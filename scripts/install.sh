#!/bin/sh
# Install mirrorfs where the systemd units of docs/systemd point: `make install` runs this.
#
#   PREFIX   where the package and its venv go            (default /opt/mirrorfs)
#   UNITDIR  where the units go                           (default /etc/systemd/system)
#   CONFDIR  where the units' env files are looked for    (default /etc/mirrorfs; only created)
#
# The venv is made like the Makefile's (Debian's /usr/bin/python3, --system-site-packages: libnbd's
# Python module comes from python3-libnbd, and nbdkit embeds that interpreter), with the package
# installed into it (not editable: the checkout can go). A venv is not relocatable, so there is no
# DESTDIR: to try it out, give another PREFIX (the units are written with it, see below).
#
# The units are docs/systemd's, with /opt/mirrorfs replaced by PREFIX when it differs. Nothing is
# enabled or started: see docs/OPERATING.md, "Named disks as systemd services".
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/mirrorfs}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CONFDIR=${CONFDIR:-/etc/mirrorfs}
PYTHON=${PYTHON:-/usr/bin/python3}

case "$PREFIX" in /*) ;; *) echo "install: PREFIX must be an absolute path: $PREFIX" >&2; exit 2 ;; esac

mkdir -p "$PREFIX" "$UNITDIR" "$CONFDIR"
test -x "$PREFIX/.venv/bin/python" || "$PYTHON" -m venv --system-site-packages "$PREFIX/.venv"
"$PREFIX/.venv/bin/python" -m pip install -q --disable-pip-version-check "$SRC"
"$PREFIX/.venv/bin/python" -c 'import nbd, mirrorfs'

for unit in "$SRC"/docs/systemd/*.service; do
    sed "s|/opt/mirrorfs/|$PREFIX/|g" "$unit" > "$UNITDIR/$(basename "$unit")"
done
echo "installed mirrorfs $("$PREFIX/.venv/bin/mirrorfs" --version | cut -d' ' -f2) in $PREFIX; units in $UNITDIR"
echo "next: systemctl daemon-reload && systemctl enable --now mirrorfs-host (docs/OPERATING.md)"
