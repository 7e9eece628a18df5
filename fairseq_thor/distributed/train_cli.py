"""``fairseq-thor-train``: fairseq-train with a trainer that saves and loads sharded experts.

Same flags, same behaviour as ``fairseq-train``; the only difference is the ``Trainer`` class,
which matters for ``--expert-parallel`` (see trainer.py) and is fairseq's own otherwise. fairseq
offers no hook to choose the trainer, so this module swaps the name ``fairseq_cli.train`` looks
up and then runs fairseq's unmodified ``cli_main``. The swap happens on import, not in ``main``:
when fairseq spawns one process per GPU itself, each child re-imports the launching script (and
with it this module) but does not call ``main``.
"""
import fairseq_cli.train as fairseq_train

from .trainer import ExpertParallelTrainer

fairseq_train.Trainer = ExpertParallelTrainer


def main():
    fairseq_train.cli_main()


if __name__ == "__main__":
    main()
