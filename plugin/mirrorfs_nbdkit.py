# The nbdkit entry script of mirrorfs: nbdkit's python plugin loads this file and calls its functions.
# All logic lives in the mirrorfs package; this only makes the package importable and re-exports the
# callbacks.
#
# How to run (normally `mirrorfs serve` does this for you, after starting the storage daemons):
#
#   PYTHONPATH=/path/to/mirrorfs-checkout nbdkit -U /tmp/disk.sock python plugin/mirrorfs_nbdkit.py \
#       source=nbd+unix:///?socket=/tmp/src.sock dest=nbd+unix:///?socket=/tmp/dst.sock
#
# nbdkit embeds Debian's /usr/bin/python3, not the project's venv: the package is found through
# PYTHONPATH, or next to this script's directory when run from a checkout.

import os
import sys

try:
    import mirrorfs  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirrorfs.plugin import *  # noqa: F401,F403,E402
