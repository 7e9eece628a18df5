"""``fairseq-thor-train``: fairseq-train with a trainer that saves and loads sharded experts.

Same flags, same behaviour as ``fairseq-train``; the only difference is the ``Trainer`` class,
which matters for ``--expert-parallel`` (see trainer.py) and is fairseq's own otherwise. fairseq
offers no hook to choose the trainer, so this module swaps the name ``fairseq_cli.train`` looks
up and then runs fairseq's unmodified ``cli_main``. The swap happens on import, not in ``main``:
when fairseq spawns one process per GPU itself, each child re-imports the launching script (and
with it this module) but does not call ``main``.
"""
import os
import sys
from typing import List, Optional

import fairseq_cli.train as fairseq_train

import fairseq_thor

from ..errors import ThorError
from .trainer import ExpertParallelTrainer

fairseq_train.Trainer = ExpertParallelTrainer


def user_dir_given(argv: List[str]) -> Optional[str]:
    for i, arg in enumerate(argv):
        if arg == "--user-dir" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--user-dir="):
            return arg.split("=", 1)[1]
    return None


def check_user_dir(argv: List[str]):
    """This command runs the installed plugin, imported before fairseq reads ``--user-dir``;
    fairseq refuses a second package of the same name with a raw ImportError ("not globally
    unique"). Say which copy is installed and what to pass instead."""
    given = user_dir_given(argv)
    installed = fairseq_thor.__path__[0]
    if given is None or os.path.abspath(given) in fairseq_thor.__path__:
        return
    if os.path.realpath(given) == os.path.realpath(installed):  # the same copy by another path
        argv[:] = [installed if a == given else f"--user-dir={installed}" if a == f"--user-dir={given}" else a
                   for a in argv]
        return
    raise ThorError(f"--user-dir {given} is another copy of fairseq_thor than the one fairseq-thor-train "
                    f"runs ({installed}); pass --user-dir {installed} (python -m fairseq_thor.path prints "
                    f"it), or install the copy you want: pip install -e {os.path.dirname(os.path.abspath(given))}")


def main():
    check_user_dir(sys.argv)
    fairseq_train.cli_main()


if __name__ == "__main__":
    main()
