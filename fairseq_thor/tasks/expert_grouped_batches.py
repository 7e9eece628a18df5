"""Task mixin: with ``--inference-routing path``, each evaluation/decoding batch shares one expert.

A ``path`` model gives each sentence one random expert for every expert layer, drawn from the
sentence's id and the seed (``routing.keyed_sentence_experts``), so the draw is known before the
batches are made. This mixin splits a split's sentences by that expert before fairseq's
``batch_by_size``: every batch then holds sentences of one expert, each layer calls one expert's
FFN on the whole batch, and decoding costs what a dense model's does, whatever E is. The draw
depends on the id alone, so the translations are the ones ungrouped batches would give; only the
batches (and the cost) change. Training batches are never grouped (training routing draws afresh).

The task learns the models' number of experts when it builds them (``remember_path_models``),
which fairseq-generate, -interactive and -validate do before they ask for batches.
"""
from typing import Dict, Optional

import numpy as np
import torch
from fairseq.data import BaseWrapperDataset

from ..modules.routing import PATH_SALT, keyed_sentence_experts


class BatchesByExpert(BaseWrapperDataset):
    """``dataset`` whose ``batch_by_size`` batches each expert's sentences on their own."""

    def __init__(self, dataset, num_experts: int, seed: int):
        super().__init__(dataset)
        self.num_experts, self.seed = num_experts, seed

    def experts_of(self, indices: np.ndarray) -> np.ndarray:
        # the ids the model will see are these dataset indices (fairseq's collaters put them in
        # sample["id"]), keyed exactly as the model's path layers key them
        keys = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return keyed_sentence_experts(keys, PATH_SALT, self.seed, self.num_experts).numpy()

    def batch_by_size(self, indices, max_tokens=None, max_sentences=None, required_batch_size_multiple=1):
        indices = np.asarray(indices, dtype=np.int64)
        experts = self.experts_of(indices)
        batches = []
        for expert in range(self.num_experts):
            mine = indices[experts == expert]  # keeps the order fairseq sorted them in (by length)
            if len(mine):
                batches.extend(self.dataset.batch_by_size(
                    mine, max_tokens=max_tokens, max_sentences=max_sentences,
                    required_batch_size_multiple=required_batch_size_multiple))
        return batches


class ExpertGroupedBatches:
    _path_experts: Optional[int] = None

    def remember_path_models(self, model):
        """Note the model's E when it evaluates with ``path`` routing (call after building it)."""
        layers = [m for m in model.modules() if hasattr(m, "spec") and hasattr(m.spec, "inference_routing")]
        if layers and all(layer.spec.inference_routing == "path" for layer in layers):
            experts = layers[0].spec.num_experts
            # an ensemble of models with other E: group by none (every batch is still correct)
            self._path_experts = experts if self._path_experts in (None, experts) else 0
        return model

    def grouped_by_path_expert(self, dataset):
        """``dataset`` wrapped to batch by path expert, or as it is when no path model was built."""
        if not self._path_experts:
            return dataset
        seed = torch.initial_seed()  # what the model's keyed draws will read (fairseq seeds it)
        cache: Dict[int, BatchesByExpert] = self.__dict__.setdefault("_grouped_datasets", {})
        wrapper = cache.get(id(dataset))
        if wrapper is None or (wrapper.num_experts, wrapper.seed) != (self._path_experts, seed):
            # fairseq reseeds every update, so each validation in training sees another seed: one
            # wrapper per split, and the iterator fairseq cached for the previous one is let go
            if wrapper is not None:
                getattr(self, "dataset_to_epoch_iter", {}).pop(wrapper, None)
            wrapper = cache[id(dataset)] = BatchesByExpert(dataset, self._path_experts, seed)
        return wrapper
