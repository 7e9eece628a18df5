"""``--task translation_multi_simple_epoch_thor``: fairseq's multilingual task plus THOR's flags.

The paper's largest gain (+2 BLEU over Switch) is in multilingual translation, where one model
serves many directions. fairseq's ``translation_multi_simple_epoch`` task keeps all its options
(``--lang-pairs``, ``--langs``/``--lang-dict``, ``--encoder-langtok``, ``--decoder-langtok``,
``--sampling-method``, ...); this subclass adds:

* THOR's decoding flags (``--inference-routing``, ``--inference-expert``, ``--inference-level``,
  ``--num-experts``, ``--consistency-alpha``), applied exactly as ``translation_thor`` applies them,
  and the update number passed on to the criterion as ``translation_thor`` does;
* BLEU validation *per direction*: ``--eval-bleu`` (with fairseq's ``--eval-bleu-args``,
  ``--eval-bleu-detok``, ``--eval-bleu-remove-bpe``, ...) logs ``bleu_SRC-TGT`` for every pair and
  their mean as ``bleu``, so ``--best-checkpoint-metric bleu`` selects on all directions;
* every validation/test sentence is evaluated (batch-size multiple 1 outside training, as in
  ``translation_thor``);
* errors that name the option when ``--lang-pairs`` asks for data or languages that are not there
  (fairseq's own checks are assertions or "Dataset not found: train").

How a validation row's direction is known: fairseq concatenates the per-direction valid sets in
``--lang-pairs`` order (a ``ConcatDataset``) and batches them by length, so one batch mixes
directions, and each row's ``id`` is its index *inside its own direction* (ids repeat across
directions). ``DirectionTaggedDataset`` makes ids global and adds ``sample["lang_pair"]``, each row's
index in ``--lang-pairs``. Language tokens cannot do this in general: ``--encoder-langtok tgt``
or a shared target language leave directions indistinguishable.
"""
import json
import logging
from argparse import Namespace
from dataclasses import fields
from typing import Dict, List

import torch
from fairseq import metrics, utils
from fairseq.data import ConcatDataset, encoders
from fairseq.tasks import register_task
from fairseq.tasks.translation import EVAL_BLEU_ORDER
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from ..errors import ThorError
from ..shared_flags import add_dataclass_args_once
from .empty_splits import refuse_empty_split
from .keyed_draws import SentenceKeyedDraws
from .multilingual_data import DirectionTaggedDataset, check_languages
from .thor_flags import ThorTaskFlags, build_with_thor_flags
from .training_guards import TrainingGuards
from .translation_thor import PassUpdateNumToCriterion, ThorTranslationConfig

logger = logging.getLogger(__name__)

# sacreBLEU's sufficient statistics, logged per direction
BLEU_STATS = ["sys_len", "ref_len"] + [f"{stat}_{n}" for stat in ("counts", "totals") for n in range(EVAL_BLEU_ORDER)]
_THOR_FLAGS = {f.name for f in fields(ThorTaskFlags)}


class ThorMultilingualFlags(ThorTranslationConfig):
    """The flags this task borrows: translation_thor's THOR flags and fairseq's ``--eval-bleu*``.

    The multilingual task is argparse-based and already has its own ``--source-lang``,
    ``--left-pad-source``, ``data``..., so only these fields of ``ThorTranslationConfig`` become
    flags; their definitions (types, defaults, help) stay in one place.
    """

    def _get_all_attributes(self) -> List[str]:
        return [k for k in super()._get_all_attributes() if k in _THOR_FLAGS or k.startswith("eval_")]


def sacrebleu_score(counts, totals, sys_len, ref_len) -> float:
    from sacrebleu.metrics import BLEU

    return BLEU.compute_bleu(correct=counts, total=totals, sys_len=int(sys_len), ref_len=int(ref_len),
                             smooth_method="exp").score  # fairseq's translation task smooths the same way


@register_task("translation_multi_simple_epoch_thor")
class MultilingualThorTask(TrainingGuards, SentenceKeyedDraws, PassUpdateNumToCriterion,
                           TranslationMultiSimpleEpochTask):
    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        # the model (in training) and the criterion also register some of these flags
        add_dataclass_args_once(parser, ThorMultilingualFlags())

    @classmethod
    def setup_task(cls, args, **kwargs):
        check_languages(args)
        if args.eval_bleu and args.lang_tok_replacing_bos_eos:
            # fairseq then builds the valid set as a SampledMultiDataset, whose rows carry no direction
            raise ThorError("--eval-bleu does not support --lang-tok-replacing-bos-eos")
        return super().setup_task(args, **kwargs)

    def build_model(self, args, from_checkpoint=False):
        model = build_with_thor_flags(self.args, args,
                                      lambda: super(MultilingualThorTask, self).build_model(args, from_checkpoint))
        if self.args.eval_bleu:
            self.tokenizer = encoders.build_tokenizer(
                Namespace(tokenizer=self.args.eval_bleu_detok, **json.loads(self.args.eval_bleu_detok_args)))
            # keep_inference_langtok: the parent would strip the language token of --target-lang,
            # which is unset in training (one model, many targets); _bleu_stats strips each row's.
            gen_args = Namespace(keep_inference_langtok=True, **json.loads(self.args.eval_bleu_args))
            self.bleu_generator = self.build_generator([model], gen_args)
        return model

    # -- data -------------------------------------------------------------------------------------

    def load_dataset(self, split, epoch=1, combine=False, **kwargs):
        self._check_pairs_in_data(split)
        refuse_empty_split(self.args.data, split, self.lang_pairs)
        super().load_dataset(split, epoch=epoch, combine=combine, **kwargs)
        dataset = self.datasets[split]
        if split != self.args.train_subset and type(dataset) is ConcatDataset:
            assert len(dataset.datasets) == len(self.lang_pairs), "one eval dataset per --lang-pairs entry"
            self.datasets[split] = DirectionTaggedDataset(dataset.datasets, dataset.sample_ratios)

    def _check_pairs_in_data(self, split):
        """fairseq says "Dataset not found: train (DIR)"; say which pair and which option instead."""
        paths = utils.split_paths(self.args.data)
        if split != self.args.train_subset:
            paths = paths[:1]  # fairseq reads valid and test from the first directory only
        option = "--lang-pairs" if self.training else "--source-lang/--target-lang"
        for pair in self.lang_pairs:
            src, tgt = pair.split("-")
            # fairseq also reads a pair from the reversed direction's files
            if not any(self.data_manager.split_exists(split, a, b, src, path, self.args.dataset_impl)
                       for path in paths for a, b in ((src, tgt), (tgt, src))):
                raise ThorError(f"{option} asks for {pair} but {paths[0]} has no {split}.{src}-{tgt}.* "
                                 f"or {split}.{tgt}-{src}.* files; binarize that pair or drop it")

    def get_batch_iterator(self, dataset, **kwargs):
        if dataset is not self.datasets.get(self.args.train_subset):
            kwargs["required_batch_size_multiple"] = 1  # evaluate every sentence (see translation_thor)
        return super().get_batch_iterator(dataset, **kwargs)

    # -- per-direction BLEU -----------------------------------------------------------------------

    def valid_step(self, sample, model, criterion):
        loss, sample_size, logging_output = super().valid_step(sample, model, criterion)
        if self.args.eval_bleu:
            for pair, stats in self._bleu_stats(sample, model).items():
                for name, value in stats.items():
                    logging_output[f"_bleu_{pair}_{name}"] = value
        return loss, sample_size, logging_output

    def _bleu_stats(self, sample, model) -> Dict[str, Dict[str, float]]:
        """sacreBLEU sufficient statistics of this batch, for every direction (zeros when absent).

        Every direction is always present so that all workers log the same keys.
        """
        import sacrebleu

        tgt_dict = self.target_dictionary
        # With --decoder-langtok every row starts from its own target language token, and that
        # token is removed from hypothesis and reference, as fairseq-generate does for --target-lang.
        _, tgt_spec = self.args.langtoks["main"]
        langtoks = torch.tensor([self.data_manager.get_decoder_langtok(pair.split("-")[1], tgt_spec)
                                 if tgt_spec else tgt_dict.eos()  # eos: nothing more to strip
                                 for pair in self.lang_pairs])
        directions = sample["lang_pair"].cpu()
        prefix = langtoks[directions].unsqueeze(1).to(sample["net_input"]["src_tokens"]) if tgt_spec else None
        gen_out = self.inference_step(self.bleu_generator, [model], sample, prefix_tokens=prefix)

        def decode(tokens, direction, unk):
            # fairseq's unk spellings: "<unk>" would be split by sacreBLEU and match the reference
            text = tgt_dict.string(tokens.int().cpu(), self.args.eval_bleu_remove_bpe,
                                   extra_symbols_to_ignore={langtoks[direction].item()}, unk_string=unk)
            return self.tokenizer.decode(text) if self.tokenizer else text

        hyps: Dict[str, List[str]] = {pair: [] for pair in self.lang_pairs}
        refs: Dict[str, List[str]] = {pair: [] for pair in self.lang_pairs}
        for i, direction in enumerate(directions.tolist()):
            pair = self.lang_pairs[direction]
            hyps[pair].append(decode(gen_out[i][0]["tokens"], direction, "UNKNOWNTOKENINHYP"))
            refs[pair].append(decode(utils.strip_pad(sample["target"][i], tgt_dict.pad()), direction,
                                     "UNKNOWNTOKENINREF"))
        if self.args.eval_bleu_print_samples:
            for pair in self.lang_pairs:
                if hyps[pair]:
                    logger.info(f"{pair} hypothesis: {hyps[pair][0]} | reference: {refs[pair][0]}")

        tokenize = {"tokenize": "none"} if self.args.eval_tokenized_bleu else {}
        stats = {pair: dict.fromkeys(BLEU_STATS, 0) for pair in self.lang_pairs}
        for pair in self.lang_pairs:
            if hyps[pair]:
                bleu = sacrebleu.corpus_bleu(hyps[pair], [refs[pair]], **tokenize)
                stats[pair].update(sys_len=bleu.sys_len, ref_len=bleu.ref_len)
                for n in range(EVAL_BLEU_ORDER):
                    stats[pair].update({f"counts_{n}": bleu.counts[n], f"totals_{n}": bleu.totals[n]})
        return stats

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        if not self.args.eval_bleu:
            return

        def total(key):
            value = sum(log.get(key, 0) for log in logging_outputs)
            return value.cpu() if torch.is_tensor(value) else value

        scored = False
        for pair in self.lang_pairs:
            key = f"_bleu_{pair}_"
            if total(f"{key}ref_len") == 0:
                continue  # no sentence of this direction in these logs (e.g. training steps)
            # Summed by the meters over batches and workers; derived metrics read the sums. Scalars,
            # not fairseq's numpy arrays: meters are saved in checkpoints, and torch's safe loader
            # refuses numpy arrays. An empty hypothesis still scores (0), unlike fairseq's
            # translation task, which then logs no "bleu" and --best-checkpoint-metric bleu fails.
            for name in BLEU_STATS:
                metrics.log_scalar(key + name, total(key + name))
            metrics.log_derived(f"bleu_{pair}", lambda meters, pair=pair: round(self._bleu(meters, pair), 2))
            scored = True
        if scored:
            metrics.log_derived("bleu", self._mean_bleu)

    def _bleu(self, meters, pair) -> float:
        key = f"_bleu_{pair}_"
        counts, totals = ([meters[f"{key}{stat}_{n}"].sum for n in range(EVAL_BLEU_ORDER)]
                          for stat in ("counts", "totals"))
        return sacrebleu_score(counts, totals, meters[f"{key}sys_len"].sum, meters[f"{key}ref_len"].sum)

    def _mean_bleu(self, meters) -> float:
        """The unweighted mean over directions, so a large direction does not hide a weak one."""
        scores = [self._bleu(meters, pair) for pair in self.lang_pairs if f"_bleu_{pair}_ref_len" in meters]
        return round(sum(scores) / len(scores), 2)
