"""What Ctrl-C and SIGTERM do to a command: one policy for the whole of it, from the moment it is invoked.

The first signal raises KeyboardInterrupt (SIGTERM as well as Ctrl-C), so that whatever is under way ends its
runs KILLED, not RUNNING; the second is ignored while that is done; a third stops at once. Blocks that end
runs or tell trials hold the first signal until they are done (`signals_held`). Nothing heavy is imported
here: the command sets this up before it imports MLflow or torch.
"""

from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


# Process-wide on purpose: a signal handler belongs to the process and runs in its main thread, so terminal_status's
# handler and the signals_held blocks can share what they know only here. Only those two write it.
class _Held:
    depth = 0  # signals_held blocks entered and not yet left
    interrupt: KeyboardInterrupt | None = None  # the signal one of them holds
    received = 0  # Ctrl-C and SIGTERM received inside the outermost terminal_status block


_held = _Held()


@contextmanager
def signals_held():
    """Hold the first Ctrl-C or SIGTERM (under terminal_status) until the block is done, then raise it. For the
    blocks that end runs and write their last tags: interrupted halfway, they would leave a run RUNNING or
    tagged unlike its trial, and a store call cut short can leave SQLite's write lock with the interrupted
    session, so that the writes of the stop itself wait on it and fail. Where the block raises an error of its
    own, that error stops what it stops instead, and the signal is forgotten: the next one counts as a first. A
    third signal is not held (terminal_status ignores the second): a block that hangs can still be stopped.
    Only the main thread, which signals interrupt, holds them: another thread's block must not hold its signal."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _held.depth += 1
    done = False
    try:
        yield
        done = True
    finally:
        _held.depth -= 1
        if _held.depth == 0 and _held.interrupt is not None:
            interrupt, _held.interrupt = _held.interrupt, None
            if done:
                raise interrupt
            _held.received = 0


@contextmanager
def terminal_status():
    """Turn SIGTERM, like Ctrl-C, into KeyboardInterrupt for the duration, so a killed run is marked KILLED, not
    RUNNING. The second signal is ignored: what it would interrupt is the ending of the runs KILLED and the
    queueing of their trials again, and a sweep's worker processes get two for one stop (a terminal's Ctrl-C
    reaches every process, then the driver sends its SIGTERM). A third interrupts the stop itself, for
    whoever insists (the next start ends what it leaves). A signal stays ignored where it is (completion workers
    ignore Ctrl-C and SIGTERM, so that the sweep decides for them). A block inside another leaves the signals to
    the outer one."""
    if threading.current_thread() is not threading.main_thread() or \
            getattr(signal.getsignal(signal.SIGTERM), "is_terminal_status", False):
        yield  # (only the main thread may set signal handlers)
        return
    _held.received = 0

    def stop(signum, frame):
        _held.received += 1
        if _held.received == 2:
            return  # the stop under way is ending the runs: one more signal must not cut that short
        interrupt = KeyboardInterrupt(f"signal {signum}")
        interrupt.signum = signum  # a sweep's worker process ends by the same signal once it has cleaned up
        if _held.received == 1 and _held.depth:
            _held.interrupt = interrupt  # raised as the block that holds it ends (signals_held)
            # One line at once (os.write: safe in a handler), so that the wait does not look like a hang.
            os.write(2, b"\nstopping once the work in hand is done (a third Ctrl-C or SIGTERM stops at once)\n")
            return
        raise interrupt

    stop.is_terminal_status = True
    previous = {}
    try:
        # An ignored signal stays ignored: completion workers ignore both, so that the sweep decides for them.
        for sig in [s for s in (signal.SIGTERM, signal.SIGINT) if signal.getsignal(s) != signal.SIG_IGN]:
            previous[sig] = signal.signal(sig, stop)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
