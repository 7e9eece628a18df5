"""Version quirks of the dependency stack, in one place.

torch >= 2.6 loads checkpoints with ``weights_only=True``. fairseq stores the training
``argparse.Namespace`` (legacy models such as the transformer keep their config in one) inside
every checkpoint, so stock ``fairseq-generate`` fails on it. We keep torch's safe loader and
allow-list exactly the classes fairseq checkpoints contain.
"""
import argparse

import torch

SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]


def allow_fairseq_checkpoint_globals():
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no safe loader to configure
        add_safe_globals(SAFE_CHECKPOINT_GLOBALS)
