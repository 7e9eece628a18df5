"""Errors a user can fix, and how a command ends on one: a single line, not a traceback.

``ThorError`` is a ``ValueError`` (callers and tests that expect one keep working) raised by the
plugin's own checks: bad flag values, unreadable checkpoints, data that cannot be trained on. Its
message names the flag or file and says what is valid or what to do. fairseq's commands do not
catch exceptions, so a 20-line traceback would bury that one line; importing the plugin installs
an exception hook that prints ``error: <message>`` for an uncaught ``ThorError`` (exit status 1),
also when fairseq raised its own exception while handling one (its "Cannot load model parameters"
around a model's refusal), and leaves every other exception to Python's usual report.
``FAIRSEQ_THOR_TRACEBACK=1`` restores the full traceback for debugging.

In a distributed run the hook writes the line itself, prefixed ``[rankN]: `` as torch's own hook
would, and ends the process at once (``os._exit(1)``): left to the interpreter's shutdown, gloo's
background threads can be torn down while still joinable and the process aborts with "terminate
called without an active exception" (status -6) instead of 1. It writes to the process's real
stderr because torch's hook points ``sys.stderr`` at a buffer that it prints only after we return.
"""
import os
import sys


class ThorError(ValueError):
    """A problem with the user's input or files, explained in the message."""


def _process_group_rank():
    """This process's rank in an initialized process group, or None outside one."""
    distributed = sys.modules.get("torch.distributed")  # never import torch just to ask
    if distributed and distributed.is_available() and distributed.is_initialized():
        return distributed.get_rank()
    return None


def thor_error_in_chain(exc: BaseException):
    """The plugin's error that ``exc`` is, or was raised while handling (fairseq wraps what a model
    raises while loading a checkpoint in its own "Cannot load model parameters" exception)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, ThorError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _one_line_for_thor_errors(previous_hook):
    def hook(exc_type, exc, tb):
        ours = thor_error_in_chain(exc)
        if ours is not None and not os.environ.get("FAIRSEQ_THOR_TRACEBACK"):
            exc = ours
            rank = _process_group_rank()
            if rank is None:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return
            sys.stdout.flush()  # what the run printed before, then the error
            lines = f"error: {exc}".splitlines()
            sys.__stderr__.write("".join(f"[rank{rank}]: {line}\n" for line in lines))
            sys.__stderr__.flush()
            os._exit(1)
        previous_hook(exc_type, exc, tb)

    hook.thor_one_line = True
    return hook


def install_one_line_errors():
    """Idempotent: a second import of the plugin does not wrap the hook again."""
    if not getattr(sys.excepthook, "thor_one_line", False):
        sys.excepthook = _one_line_for_thor_errors(sys.excepthook)
