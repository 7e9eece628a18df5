"""THOR versions of fairseq's translation transformer sizes: same name with a ``thor_`` prefix,
fairseq's hyper-parameters plus the THOR expert defaults (see ``expert_options``)."""
from fairseq.models import register_model_architecture
from fairseq.models.transformer import transformer_legacy as dense

from .thor_transformer import ThorTransformerModel  # noqa: F401  (registered before its architectures)
from .expert_options import set_expert_defaults


def _thor_version(dense_arch):
    def arch(args):
        set_expert_defaults(args)
        dense_arch(args)

    arch.__doc__ = f"fairseq's {dense_arch.__name__} with THOR expert layers."
    return arch


# Registered one by one so that each name is greppable next to the fairseq size it mirrors.
thor_transformer = register_model_architecture("thor_transformer", "thor_transformer")(
    _thor_version(dense.base_architecture))
thor_transformer_iwslt_de_en = register_model_architecture(
    "thor_transformer", "thor_transformer_iwslt_de_en")(_thor_version(dense.transformer_iwslt_de_en))
thor_transformer_wmt_en_de = register_model_architecture(
    "thor_transformer", "thor_transformer_wmt_en_de")(_thor_version(dense.transformer_wmt_en_de))
thor_transformer_vaswani_wmt_en_de_big = register_model_architecture(
    "thor_transformer", "thor_transformer_vaswani_wmt_en_de_big")(
    _thor_version(dense.transformer_vaswani_wmt_en_de_big))
thor_transformer_vaswani_wmt_en_fr_big = register_model_architecture(
    "thor_transformer", "thor_transformer_vaswani_wmt_en_fr_big")(
    _thor_version(dense.transformer_vaswani_wmt_en_fr_big))
thor_transformer_wmt_en_de_big = register_model_architecture(
    "thor_transformer", "thor_transformer_wmt_en_de_big")(_thor_version(dense.transformer_wmt_en_de_big))
thor_transformer_wmt_en_de_big_t2t = register_model_architecture(
    "thor_transformer", "thor_transformer_wmt_en_de_big_t2t")(
    _thor_version(dense.transformer_wmt_en_de_big_t2t))
thor_transformer_tiny = register_model_architecture("thor_transformer", "thor_transformer_tiny")(
    _thor_version(dense.tiny_architecture))
