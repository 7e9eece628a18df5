"""fairseq's ``--patience`` that survives a resume, and a run it stopped that stays stopped.

fairseq counts validations without a new best in attributes of ``fairseq_cli.train.should_stop_early``
(``best``, ``num_runs``): process memory that no checkpoint keeps. A run resumed from
``checkpoint_last.pt`` starts counting from zero, with the first validation after the resume as its
best, however much worse than the real best it is. So a long run interrupted once stops later than
the same run left alone, and one interrupted every few validations never stops. Rerunning the
command of a run that already stopped early trains ``--patience`` more validations and overwrites
``checkpoint_last.pt``.

Loading the plugin closes both gaps for every ``fairseq-train`` that loads it:

* every checkpoint's ``extra_state`` gains ``patience``: the counter, its best value and the metric
  it follows (through ``Trainer.state_dict``, which one-process and expert-parallel saves both use);
* ``checkpoint_utils.load_checkpoint`` puts the counter back when the resumed run follows the same
  metric in the same direction (otherwise it logs that the count restarts), and when the counter had
  already reached ``--patience`` it says so and exits 0 before any update, leaving every checkpoint
  as it was (raise ``--patience`` to train on).
"""
import logging
import sys
from typing import Optional

from fairseq import checkpoint_utils
from fairseq.trainer import Trainer

logger = logging.getLogger(__name__)


def _should_stop_early():
    """fairseq's counter lives on a function of the training script; None outside fairseq-train."""
    train = sys.modules.get("fairseq_cli.train")
    return getattr(train, "should_stop_early", None)


def patience_state(checkpoint_cfg) -> Optional[dict]:
    """The counter as it stands, or None before the first validation (or outside fairseq-train)."""
    counter = _should_stop_early()
    if counter is None or getattr(counter, "best", None) is None:
        return None
    return {"best": counter.best, "num_runs": counter.num_runs,
            "metric": checkpoint_cfg.best_checkpoint_metric,
            "maximize": bool(checkpoint_cfg.maximize_best_checkpoint_metric)}


def restore(checkpoint_cfg, extra_state: Optional[dict], updates: Optional[int] = None):
    """Put a saved counter back into fairseq's; exit 0 when the saved run had already stopped."""
    counter = _should_stop_early()
    saved = (extra_state or {}).get("patience")
    if counter is None or not saved or checkpoint_cfg.patience <= 0:
        return
    metric, maximize = checkpoint_cfg.best_checkpoint_metric, bool(checkpoint_cfg.maximize_best_checkpoint_metric)
    if (saved["metric"], saved["maximize"]) != (metric, maximize):
        logger.info(f"--patience counts afresh: the checkpoint counted validations of {saved['metric']} "
                    f"({'max' if saved['maximize'] else 'min'}imized), this run follows {metric} "
                    f"({'max' if maximize else 'min'}imized)")
        return
    counter.best, counter.num_runs = saved["best"], saved["num_runs"]
    at = "" if updates is None else f" at update {updates}"
    if counter.num_runs >= checkpoint_cfg.patience:
        logger.info(f"training already finished: it stopped early{at} (no better {metric} than "
                    f"{counter.best} in the last {counter.num_runs} validations, --patience "
                    f"{checkpoint_cfg.patience}); nothing to do (raise --patience to train further)")
        raise SystemExit(0)  # before any update, so no checkpoint is written
    logger.info(f"--patience resumed: best {metric} {counter.best}, {counter.num_runs} validation(s) "
                f"without a better one{at}")


def _state_dict_with_patience(original):
    def state_dict(self):
        state = original(self)
        saved = patience_state(self.cfg.checkpoint)
        if saved is not None:
            state.setdefault("extra_state", {})["patience"] = saved
        return state

    state_dict.thor_patience = True
    return state_dict


def _load_checkpoint_with_patience(original):
    def load_checkpoint(cfg, trainer, **passthrough_args):
        extra_state, epoch_itr = original(cfg, trainer, **passthrough_args)
        restore(cfg, extra_state, trainer.get_num_updates())
        return extra_state, epoch_itr

    load_checkpoint.thor_patience = True
    return load_checkpoint


def install():
    """Wrap the trainer's state and fairseq's resume (idempotent)."""
    if not getattr(Trainer.state_dict, "thor_patience", False):
        Trainer.state_dict = _state_dict_with_patience(Trainer.state_dict)
    if not getattr(checkpoint_utils.load_checkpoint, "thor_patience", False):
        checkpoint_utils.load_checkpoint = _load_checkpoint_with_patience(checkpoint_utils.load_checkpoint)
