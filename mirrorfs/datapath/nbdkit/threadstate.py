"""A Python thread state for each of nbdkit's worker threads, kept for the life of its connection.

nbdkit's python plugin takes the GIL for every callback with PyGILState_Ensure() and gives it back
with PyGILState_Release(). On a thread that Python did not create, that pair builds a new
PyThreadState and tears it down again on *every* request: an allocation, a data stack, and the
interpreter's thread list lock each time. That, not our Python code, was the price of a small request:
an nbdkit Python plugin whose pwrite does nothing served 27k 4 KiB writes/s with 16 worker threads on
the project's 2-core machine; keeping the thread state, 136k (see docs/PERFORMANCE.md).

So the first data callback on each worker thread takes one extra PyGILState_Ensure() that it never
releases: the thread state outlives the callback, and nbdkit's own Ensure/Release pairs just
increment and decrement its counter. nbdkit joins a connection's worker threads before it calls the
plugin's close(), so close() can then delete the states those dead threads left behind: a client
that reconnects all day does not grow the process. (If nbdkit is quitting it skips close(); the
interpreter's finalization deletes every remaining thread state.)

A thread state also carries `threading.local()` data, which therefore now lives as long as the
worker thread instead of one callback.

This module runs inside nbdkit's embedded interpreter: standard library only.
"""

import ctypes
import threading

_api = ctypes.pythonapi         # a PyDLL: calls keep the GIL, as these functions require
_api.PyGILState_Ensure.restype = ctypes.c_int
_api.PyGILState_Release.argtypes = [ctypes.c_int]
_api.PyGILState_GetThisThreadState.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]

_this_thread = threading.local()        # `kept` is set once this thread's state is kept


class ThreadStates:
    """The thread states kept by one connection's worker threads."""

    def __init__(self):
        self._kept = []                 # (PyThreadState address, the Ensure state to give back)

    def keep(self):
        """Call at the start of every data callback: cheap after the first call on a thread."""
        try:
            _this_thread.kept
        except AttributeError:
            state = _api.PyGILState_Ensure()
            self._kept.append((_api.PyGILState_GetThisThreadState(), state))
            _this_thread.kept = True

    def release(self):
        """From the connection's close(): once its worker threads have exited, delete their states.
        Without worker threads (nbdkit --threads 1) the requests ran on this very thread: give back
        the extra Ensure, and nbdkit's Release after close() deletes the state as it normally would."""
        current = _api.PyGILState_GetThisThreadState()
        kept, self._kept = self._kept, []
        for address, state in kept:
            if address == current:
                _api.PyGILState_Release(state)
            else:
                _api.PyThreadState_Clear(address)
                _api.PyThreadState_Delete(address)

