"""Ctrl-C and SIGTERM: both unwind a run in the main thread (exit 130 and 143).

``Terminated`` is raised for SIGTERM, by ``peel-fed``'s own handler or, once Ray has replaced it
during a simulation (Ray's handler exits with status 15), by ``sim.simulate``.
"""

from __future__ import annotations

import signal


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that it unwinds the run as Ctrl-C does."""


def raise_terminated(*_) -> None:
    raise Terminated


def is_sigterm_exit(exc: SystemExit) -> bool:
    """Whether ``exc`` is Ray's exit on SIGTERM (``sys.exit(signal.SIGTERM)``)."""
    return exc.code == signal.SIGTERM
