"""Errors a user can fix, and how a command ends on one: a single line, not a traceback.

``ThorError`` is a ``ValueError`` (callers and tests that expect one keep working) raised by the
plugin's own checks: bad flag values, unreadable checkpoints, data that cannot be trained on. Its
message names the flag or file and says what is valid or what to do. fairseq's commands do not
catch exceptions, so a 20-line traceback would bury that one line; importing the plugin installs
an exception hook that prints ``error: <message>`` for an uncaught ``ThorError`` (exit status 1)
and leaves every other exception to Python's usual report. ``FAIRSEQ_THOR_TRACEBACK=1`` restores
the full traceback for debugging.
"""
import os
import sys


class ThorError(ValueError):
    """A problem with the user's input or files, explained in the message."""


def _one_line_for_thor_errors(previous_hook):
    def hook(exc_type, exc, tb):
        if issubclass(exc_type, ThorError) and not os.environ.get("FAIRSEQ_THOR_TRACEBACK"):
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return
        previous_hook(exc_type, exc, tb)

    hook.thor_one_line = True
    return hook


def install_one_line_errors():
    """Idempotent: a second import of the plugin does not wrap the hook again."""
    if not getattr(sys.excepthook, "thor_one_line", False):
        sys.excepthook = _one_line_for_thor_errors(sys.excepthook)
