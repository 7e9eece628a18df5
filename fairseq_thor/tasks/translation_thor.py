"""``--task translation_thor``: fairseq's bilingual translation task plus THOR's decoding flags.

* ``--inference-routing`` / ``--inference-expert`` choose how experts are used by
  ``fairseq-generate``, ``fairseq-interactive``, ``fairseq-validate`` and BLEU validation
  (those commands get no ``--arch``, so the model's own flags are not parsed there).
* Commands written for the reference implementation keep working: ``--inference-level`` (0 token,
  1 sentence), ``--num-experts`` (checked against the checkpoint) and ``--consistency-alpha``
  (used by the THOR criterion in training, accepted and unused when decoding).
* The criterion learns fairseq's update number (``thor_consistency``'s
  ``--consistency-alpha-warmup-updates`` needs it): see ``PassUpdateNumToCriterion``.
* Training commands get the checks of ``training_guards`` (a finished run is not extended,
  ``--fp16`` needs CUDA, ``--consistency-alpha`` needs ``--criterion thor_consistency``).
* An empty split is refused with its name and files (``empty_splits``), a data folder without its
  dictionaries with the missing names (``dictionaries``), and an evaluation split with a sentence
  longer than the model's positions with its sentences (``overlong_sentences``).
* With ``--inference-routing path`` evaluation and decoding batches are grouped by the sentences'
  expert, so decoding costs one FFN per layer (``expert_grouped_batches``).
* A resumed training run trains on the batches an uninterrupted one would (``resumable_batches``).
* Every sentence of a validation or test split is evaluated: fairseq's ``batch_by_size`` drops a
  final batch whose size is not a multiple of ``--required-batch-size-multiple`` (default 8), so
  outside training this task asks for a multiple of 1.
BLEU validation is fairseq's (``--eval-bleu``, ``--eval-bleu-remove-bpe sentencepiece``, ...).
"""
from dataclasses import dataclass

from fairseq.tasks import register_task
from fairseq.tasks.translation import TranslationConfig, TranslationTask

from ..shared_flags import add_dataclass_args_once
from .dictionaries import refuse_missing_dictionaries
from .empty_splits import refuse_empty_split
from .expert_grouped_batches import ExpertGroupedBatches
from .keyed_draws import SentenceKeyedDraws
from .overlong_sentences import refuse_overlong
from .resumable_batches import BatchesAsIfFromEpochOne
from .thor_flags import ThorTaskFlags, build_with_thor_flags
from .training_guards import TrainingGuards


@dataclass
class ThorTranslationConfig(TranslationConfig, ThorTaskFlags):
    pass


class PassUpdateNumToCriterion:
    """Tell a criterion that has ``set_num_updates`` the update number before each training step.

    fairseq's Trainer gives ``update_num`` (its count, restored from the checkpoint on resume) to
    ``task.train_step``, which passes it to the model only; a criterion has no hook of its own.
    """

    def train_step(self, sample, model, criterion, optimizer, update_num, ignore_grad=False):
        if hasattr(criterion, "set_num_updates"):
            criterion.set_num_updates(update_num)
        return super().train_step(sample, model, criterion, optimizer, update_num, ignore_grad)


@register_task("translation_thor", dataclass=ThorTranslationConfig)
class ThorTranslationTask(TrainingGuards, SentenceKeyedDraws, ExpertGroupedBatches, PassUpdateNumToCriterion,
                          BatchesAsIfFromEpochOne, TranslationTask):
    cfg: ThorTranslationConfig

    @classmethod
    def add_args(cls, parser):
        # the model (in training) and the criterion also register some of these flags
        add_dataclass_args_once(parser, ThorTranslationConfig())

    def build_model(self, cfg, from_checkpoint=False):
        return self.remember_path_models(build_with_thor_flags(
            self.cfg, cfg, lambda: super(ThorTranslationTask, self).build_model(cfg, from_checkpoint)))

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        src, tgt = self.cfg.source_lang, self.cfg.target_lang
        refuse_empty_split(self.cfg.data, split, [f"{src}-{tgt}"] if src and tgt else None)
        return super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        refuse_missing_dictionaries(cfg)  # before fairseq opens them (a FileNotFoundError traceback)
        return super().setup_task(cfg, **kwargs)

    def get_batch_iterator(self, dataset, **kwargs):
        if dataset is not self.datasets.get(self.cfg.train_subset):
            if not kwargs.get("ignore_invalid_inputs"):
                split = next((name for name, d in self.datasets.items() if d is dataset), "evaluation")
                refuse_overlong(dataset, kwargs.get("max_positions"), split)
            kwargs["required_batch_size_multiple"] = 1  # evaluate every sentence (see docstring)
            dataset = self.grouped_by_path_expert(dataset)
        return super().get_batch_iterator(dataset, **kwargs)
