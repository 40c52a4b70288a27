"""The exception tree shared by the package.

The CLI turns every `Error` into one line on stderr and a non-zero exit; anything else is a bug and
keeps its traceback.
"""


class Error(Exception):
    """A failure a user can understand and act on."""


class UsageError(Error):
    """A bad option, path or combination of inputs."""


class ImageError(Error):
    """An image file that is missing, unreadable or not what it should be."""


class BackendError(Error):
    """An NBD endpoint that cannot be reached or does not behave."""


class ProcessError(Error):
    """A child process (qemu-storage-daemon, qemu-nbd, nbdkit) that failed to start or died."""
