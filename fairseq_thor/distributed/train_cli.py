"""``fairseq-thor-train``: fairseq-train with a trainer that saves and loads sharded experts.

Same flags, same behaviour as ``fairseq-train``; the only difference is the ``Trainer`` class,
which matters for ``--expert-parallel`` (see trainer.py) and is fairseq's own otherwise. fairseq
offers no hook to choose the trainer, so this entry point swaps the name ``fairseq_cli.train``
looks up, in this process only, and then runs fairseq's unmodified ``cli_main``.
"""
import fairseq_cli.train as fairseq_train

from .trainer import ExpertParallelTrainer


def main():
    fairseq_train.Trainer = ExpertParallelTrainer
    fairseq_train.cli_main()


if __name__ == "__main__":
    main()
