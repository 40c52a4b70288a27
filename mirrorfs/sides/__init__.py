"""The kinds of side a disk can have, as the user names them: image files, NBD URIs, RBD images.

    endpoints.py   SOURCE and DEST resolved to something a storage daemon or libnbd can open
    images.py      qemu-img, wrapped: an image file's format, size, chain; operations on it
    rbd.py         Ceph RBD images: spelling, probes, the pool's state
"""
