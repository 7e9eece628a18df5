"""Version quirks of the dependency stack, in one place.

torch >= 2.6 loads checkpoints with ``weights_only=True``. We keep that safe loader and allow-list
exactly the classes fairseq checkpoints contain:

* ``argparse.Namespace``: legacy (argparse-based) models such as the transformer keep their whole
  config in one, so stock ``fairseq-generate`` fails on every such checkpoint without it;
* numpy arrays and scalars: fairseq's ``--eval-bleu`` logs its n-gram counts as numpy arrays, and
  the metric meters holding them are saved in the checkpoint's ``extra_state``.
"""
import argparse

import numpy as np
import torch

try:  # numpy >= 2 moved its internals to numpy._core
    from numpy._core.multiarray import _reconstruct, scalar
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct, scalar


def _numpy_globals():
    dtype_classes = [type(np.dtype(t)) for t in (np.int64, np.int32, np.float64, np.float32)]
    return [_reconstruct, scalar, np.ndarray, np.dtype, *dtype_classes]


SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_globals()]


def allow_fairseq_checkpoint_globals():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no safe loader to configure
        add_safe_globals(SAFE_CHECKPOINT_GLOBALS)
