"""Version quirks of the dependency stack, in one place.

torch >= 2.6 loads checkpoints with ``weights_only=True``. We keep that safe loader and allow-list
exactly the classes fairseq checkpoints contain:

* ``argparse.Namespace``: legacy (argparse-based) models such as the transformer keep their whole
  config in one, so stock ``fairseq-generate`` fails on every such checkpoint without it;
* numpy arrays and scalars: fairseq's ``--eval-bleu`` logs its n-gram counts as numpy arrays, and
  the metric meters holding them are saved in the checkpoint's ``extra_state``.

fairscale 0.4 decorates functions with ``torch.cuda.amp.custom_fwd``/``custom_bwd``, which torch >=
2.4 deprecates with a FutureWarning each, at import: four lines before anything a command prints.
The plugin silences exactly those (by message and module) before it imports fairseq. A stock
``fairseq-*`` command imports fairscale through fairseq before it loads any ``--user-dir``, so
there only the environment can do it: ``QUIET_FAIRSCALE`` is the ``PYTHONWARNINGS`` value the
shipped scripts set.
"""
import argparse
import warnings

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


FAIRSCALE_AMP_DEPRECATION = r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated"
QUIET_FAIRSCALE = "ignore::FutureWarning:fairscale.experimental.nn.offload"  # PYTHONWARNINGS syntax


def quiet_known_deprecations():
    warnings.filterwarnings("ignore", message=FAIRSCALE_AMP_DEPRECATION, category=FutureWarning,
                            module=r"fairscale\.")


def allow_fairseq_checkpoint_globals():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no safe loader to configure
        add_safe_globals(SAFE_CHECKPOINT_GLOBALS)
