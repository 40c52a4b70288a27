"""The supervisor's exception tree: one root, drawn here.

    Error                   a failure a user can understand and act on: one line, exit 1
    ├── UsageError          a bad option, path or combination of inputs: exit 2
    │   └── PhaseError          a command the disk's phase does not allow (control.controller)
    ├── ImageError          an image file that is missing, unreadable or not what it should be
    ├── BackendError        an NBD endpoint that cannot be reached or does not behave
    ├── ProcessError        a child process that failed to start or died
    ├── RecordError         the host's registry of named disks cannot be used (host.registry)
    └── GroupRecordError    a group's commit record cannot be used (host.grouprecord)

The CLI turns every `Error` into one line on stderr and a non-zero exit (mirrorfs.cli.main);
anything else is a bug and keeps its traceback. Every exception class of the supervisor's modules
derives from Error (tests/unit/test_core.py checks it); a class defined beside the code that raises
it is drawn here.

What the supervisor takes from others is converted where it comes in, never let through:
- the data path's tree (mirrorfs.datapath.errors): a StateError of the state directory it reads
  becomes a UsageError, a SideUnreachable of the one connect path (backend.open_handle) a
  BackendError;
- the control protocol's ControlError (mirrorfs.common.jsonlines, common's tree): an Error where a
  control socket is asked (daemons.tree.ProcessTree.datapath, host.hostctl, cli), while a request
  handler converts an Error back into a ControlError, its refusal (control.socket, host.requests).

Standard library only.
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
