"""Flags that two registered components both accept.

The reference THOR code put ``--num-experts``, ``--consistency-alpha`` and the inference flags on
its task, so users' ``fairseq-generate`` commands carry them; here they belong to the model and the
criterion, which ``fairseq-generate`` does not parse (it is given no ``--arch`` or THOR criterion).
``translation_thor`` therefore accepts them too. fairseq adds model flags, then task flags, then
criterion flags to one argparse parser, and argparse refuses a flag added twice, so each component
adds only the flags not yet present. Both write to the same ``dest`` with the same default, so the
value is the same whichever component registered the flag.
"""
import argparse

from fairseq.dataclass.utils import gen_parser_from_dataclass

# --consistency-alpha, accepted by thor_consistency and by the THOR tasks: one default, one help.
# Measured on the demo's budget (see README): the paper's alpha = 5 slows fitting in short runs.
DEFAULT_CONSISTENCY_ALPHA = 1.0
CONSISTENCY_ALPHA_HELP = (
    "weight of the symmetric KL between the two stochastic passes (THOR's consistency "
    "regulariser); 0 trains on the two cross-entropies alone (the paper uses 5 for IWSLT)"
)


def add_dataclass_args_once(parser: argparse.ArgumentParser, dataclass_instance):
    """Like fairseq's ``gen_parser_from_dataclass``, skipping flags the parser already has."""
    scratch = argparse.ArgumentParser(add_help=False)
    gen_parser_from_dataclass(scratch, dataclass_instance)
    taken = set(parser._option_string_actions)  # argparse has no public lookup for this
    for action in scratch._actions:
        if not taken.intersection(action.option_strings):
            parser._add_action(action)
