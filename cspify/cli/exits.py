"""How a command ends: a CspifyError is one ``error:`` line, a ``hint:`` line and its exit
code; any other exception an internal error (exit 1); Ctrl-C (SIGINT) and SIGTERM stop the
work cleanly with exit code 130 or 143.

    @click.command()
    def analyze(**options):
        with guard(options["debug"]):        # --debug: the Python traceback instead
            ...                              # the command's work
"""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from contextlib import contextmanager

import click

from cspify.errors import CspifyError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """A stop from outside: Ctrl-C (SIGINT) or SIGTERM (``kill``, a job scheduler).

    A KeyboardInterrupt, so ``with`` blocks unwind as for Ctrl-C (``Outputs`` discards what
    it staged) and ``except Exception`` in the work does not swallow it; a long loop that
    wants to save its state first catches it, saves, and raises it again.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        """The shell's convention: 128 + the signal's number (130 for SIGINT, 143 for SIGTERM)."""
        return 128 + self.signum


@contextmanager
def stop_on_signals():
    """Inside the block, SIGINT and SIGTERM raise ``Interrupted`` in the main thread; the
    previous handlers come back afterwards. A signal the process was told to ignore (as
    ``nohup`` or a shell's ``&`` do) stays ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set handlers, and only it receives them
        return

    def stop(signum, frame):
        raise Interrupted(signum)

    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(s, stop)
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def guard(debug: bool):
    """The one wrapper around a command's work.

    CspifyErrors become one ``error:`` line, a ``hint:`` line and their exit code; any other
    exception is an internal error (exit 1); Ctrl-C and SIGTERM stop the work cleanly
    (files being written are discarded) with exit code 130 or 143. ``--debug`` shows the
    Python traceback instead (before the lines, for a stop).
    """
    try:
        with stop_on_signals():
            yield
    except KeyboardInterrupt as stop:
        code = stop.exit_code if isinstance(stop, Interrupted) else 128 + signal.SIGINT
        if debug:
            traceback.print_exc()
        name = "Ctrl-C (SIGINT)" if code == 128 + signal.SIGINT else signal.Signals(code - 128).name
        click.echo(f"error: interrupted by {name}.", err=True)
        click.echo("hint: no file was left half-written; run the command again to finish it", err=True)
        sys.exit(code)
    except CspifyError as error:
        if debug:
            raise
        click.echo(f"error: {error.message}", err=True)
        if error.hint:
            click.echo(f"hint: {error.hint}", err=True)
        sys.exit(error.exit_code)
    except Exception as error:  # a bug of ours: say so in one line
        if debug:
            raise
        click.echo(f"error: internal error ({type(error).__name__}: {error}).", err=True)
        click.echo("hint: rerun with --debug and report the traceback", err=True)
        sys.exit(1)
