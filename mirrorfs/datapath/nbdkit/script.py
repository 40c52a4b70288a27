# The script nbdkit's python plugin loads: it makes the mirrorfs package importable and re-exports
# the callbacks of mirrorfs.datapath.nbdkit.callbacks. No logic lives here.
#
# How to run (normally `mirrorfs serve` does this, after starting the storage daemons):
#
#   nbdkit -U /tmp/disk.sock python "$(python -c 'import mirrorfs.datapath as d; print(d.NBDKIT_SCRIPT)')" \
#       source=nbd+unix:///?socket=/tmp/src.sock dest=nbd+unix:///?socket=/tmp/dst.sock
#
# nbdkit embeds Debian's /usr/bin/python3, not the interpreter mirrorfs was installed for: when the
# package is not importable there, the directory holding it (a checkout, or a venv's site-packages
# for `pip install .`) is put on the path. That directory is three levels above this file.

import os
import sys

try:
    import mirrorfs.datapath  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__))))))

from mirrorfs.datapath.nbdkit.callbacks import *  # noqa: F401,F403,E402
