"""mirrorfs: live disk migration served as an NBD device.

Reads come from the source, writes, zeroes and trims go to both the source and the destination, and
the disk can switch to the destination without disconnecting its clients.
"""

__version__ = "0.1.0"
