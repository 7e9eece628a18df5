"""Each expert of a THOR checkpoint scored on a validation split, for ``export-dense --expert best``.

A dense export keeps one expert of every bank. Which one matters little when the consistency term
has done its job, but it can be measured: the model decodes with ``--inference-routing fixed
--inference-expert K`` exactly as the export with expert K does, so the expert with the lowest
validation loss (nll per target token, no label smoothing, teacher-forced) is the one to keep.
"""
import os
import tempfile
from typing import List

import torch
from fairseq import checkpoint_utils

from .errors import ThorError

MAX_TOKENS = 4000  # per validation batch; the result does not depend on it


def expert_valid_losses(state: dict, data_dir: str, split: str = "valid") -> List[float]:
    """Validation nll per target token (natural log) of the model in ``state`` with each expert."""
    if not os.path.isdir(data_dir):
        raise ThorError(f"--data-dir {data_dir}: no such folder (the fairseq-preprocess output the "
                        f"model was trained on)")
    with tempfile.TemporaryDirectory() as scratch:  # fairseq builds models from files
        path = os.path.join(scratch, "model.pt")
        torch.save({k: v for k, v in state.items() if k != "last_optimizer_state"}, path)
        models, _, task = checkpoint_utils.load_model_ensemble_and_task([path], arg_overrides={"data": data_dir})
    model = models[0].eval()
    task.load_dataset(split)
    dataset = task.dataset(split)
    pad = task.target_dictionary.pad()
    losses = []
    for expert in range(model.args.num_experts):
        model.set_inference_routing("fixed", expert)
        total, tokens = 0.0, 0
        batches = task.get_batch_iterator(dataset, max_tokens=MAX_TOKENS, max_positions=model.max_positions(),
                                          ignore_invalid_inputs=False).next_epoch_itr(shuffle=False)
        with torch.no_grad():
            for sample in batches:
                lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
                target = sample["target"]
                picked = lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                keep = target.ne(pad)
                total -= picked[keep].double().sum().item()
                tokens += int(keep.sum())
        losses.append(total / max(tokens, 1))
    return losses
