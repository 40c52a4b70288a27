"""The processes behind one served disk, each a class with start()/stop() safe to call twice.

    storage.py     qemu-storage-daemon exporting one image (with its chain) over NBD
    nbdkit.py      the nbdkit process that serves the disk to clients, running the data path
    tree.py        the process tree of one disk, and its one switch primitive
"""
