# A pointer for people who look here first: the script nbdkit loads is part of the installed package,
# mirrorfs/datapath/nbdkit/script.py (so that `pip install .` serves a disk too). This file does the
# same from a checkout:   nbdkit python plugin/mirrorfs_nbdkit.py source=URI dest=URI

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mirrorfs.datapath.nbdkit.callbacks import *  # noqa: F401,F403,E402
