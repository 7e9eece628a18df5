"""The ``thor_transformer`` model: fairseq's transformer whose chosen layers carry experts.

Only the layer-building hooks change: ``build_encoder`` / ``build_decoder`` return encoders and
decoders whose ``build_*_layer`` put a THOR layer where ``--{encoder,decoder}-expert-layers`` say
and fairseq's own layer everywhere else. With ``--num-experts 1`` every layer is fairseq's, so the
model (and its state dict) is exactly a dense transformer.
"""
from dataclasses import replace
from typing import Optional

import torch
import torch.distributed as dist

from fairseq.distributed import fsdp_wrap
from fairseq.models import register_model
from fairseq.models.transformer import (
    TransformerConfig,
    TransformerDecoderBase,
    TransformerEncoderBase,
    TransformerModel,
)
from fairseq.modules.checkpoint_activations import checkpoint_wrapper
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from ..modules.expert_parallel_ffn import ExpertParallelFFN
from ..errors import ThorError
from ..modules.experts import ExpertLinear
from .expert_layers import ExpertFFNMixin, ThorTransformerDecoderLayer, ThorTransformerEncoderLayer
from .expert_options import (
    ExpertSpec,
    add_expert_args,
    as_namespace,
    set_expert_defaults,
    validate_eval_capacity_factor,
    validate_inference,
)


DECODER_SALT = 1 << 20  # decoder layer i is keyed apart from encoder layer i


def wrap_layer(layer, cfg):
    """Apply fairseq's activation checkpointing and FSDP wrapping, as its own layer builders do."""
    if cfg.checkpoint_activations:
        layer = checkpoint_wrapper(layer, offload_to_cpu=cfg.offload_activations)
    # a checkpointed layer must always be wrapped by FSDP, whatever its size (fairseq's rule)
    return fsdp_wrap(layer, min_num_params=0 if cfg.checkpoint_activations else cfg.min_params_to_wrap)


def set_token_ids(stack, tokens):
    """Hash routing needs the token id of every row: hand ``tokens`` (B x T) to the layers that
    route by hash, flattened in the layers' T x B row order."""
    if stack.expert_spec.router == "hash":
        rows = tokens.t().reshape(-1)
        for layer in stack.layers:
            if isinstance(layer, ExpertFFNMixin):
                layer.token_ids = rows


class ThorTransformerEncoder(TransformerEncoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, return_fc=False):
        # fairseq builds the layers inside its constructor without passing their index, so the
        # spec and a running count must exist before super().__init__ calls build_encoder_layer.
        self.expert_spec = replace(ExpertSpec.from_cfg(cfg, "encoder"), vocab_size=len(dictionary))
        self._layers_built = 0
        super().__init__(cfg, dictionary, embed_tokens, return_fc=return_fc)

    def forward_scriptable(self, src_tokens, *args, **kwargs):
        set_token_ids(self, src_tokens)  # B x T
        return super().forward_scriptable(src_tokens, *args, **kwargs)

    def build_encoder_layer(self, cfg):
        index, self._layers_built = self._layers_built, self._layers_built + 1
        if self.expert_spec.has_experts(index):
            layer = ThorTransformerEncoderLayer(cfg, self.expert_spec, return_fc=self.return_fc)
            layer.route_salt = index  # keyed inference draws differ per layer
        else:
            layer = TransformerEncoderLayerBase(cfg, return_fc=self.return_fc)
        return wrap_layer(layer, cfg)


class ThorTransformerDecoder(TransformerDecoderBase):
    def __init__(self, cfg, dictionary, embed_tokens, no_encoder_attn=False, output_projection=None):
        self.expert_spec = replace(ExpertSpec.from_cfg(cfg, "decoder"),  # see ThorTransformerEncoder
                                   vocab_size=len(dictionary))
        self._layers_built = 0
        super().__init__(cfg, dictionary, embed_tokens, no_encoder_attn=no_encoder_attn,
                         output_projection=output_projection)

    def extract_features_scriptable(self, prev_output_tokens, encoder_out=None,
                                    incremental_state=None, *args, **kwargs):
        # fairseq feeds only the newest position to the layers when decoding step by step
        set_token_ids(self, prev_output_tokens if incremental_state is None
                      else prev_output_tokens[:, -1:])
        return super().extract_features_scriptable(prev_output_tokens, encoder_out,
                                                   incremental_state, *args, **kwargs)

    def build_decoder_layer(self, cfg, no_encoder_attn=False):
        index, self._layers_built = self._layers_built, self._layers_built + 1
        if self.expert_spec.has_experts(index):
            layer = ThorTransformerDecoderLayer(cfg, self.expert_spec, no_encoder_attn)
            layer.route_salt = DECODER_SALT + index
        else:
            layer = TransformerDecoderLayerBase(cfg, no_encoder_attn)
        return wrap_layer(layer, cfg)


@register_model("thor_transformer")
class ThorTransformerModel(TransformerModel):
    """THOR: Transformer witH StOchastic ExpeRts (Zuo et al., ICLR 2022, arXiv 2110.04260)."""

    @classmethod
    def add_args(cls, parser):
        super().add_args(parser)
        add_expert_args(parser)

    @classmethod
    def build_model(cls, args, task):
        args = as_namespace(args)  # fairseq-hydra-train: see as_namespace
        set_expert_defaults(args)
        if args.expert_parallel and not (dist.is_available() and dist.is_initialized()):
            raise ThorError(
                "this is an --expert-parallel model, whose experts live on several processes: "
                "train it with one process per rank (fairseq-thor-train, --distributed-world-size "
                "W > 1; see the README). To decode or evaluate on one device, consolidate the "
                "checkpoint first: fairseq-thor-consolidate CHECKPOINT --out consolidated.pt"
            )
        return super().build_model(args, task)

    @classmethod
    def build_encoder(cls, cfg, src_dict, embed_tokens):
        return ThorTransformerEncoder(TransformerConfig.from_namespace(cfg), src_dict, embed_tokens)

    @classmethod
    def build_decoder(cls, cfg, tgt_dict, embed_tokens):
        cfg = TransformerConfig.from_namespace(cfg)
        return ThorTransformerDecoder(cfg, tgt_dict, embed_tokens,
                                      no_encoder_attn=cfg.no_cross_attention)

    def set_inference_routing(self, mode: str, expert: int = 0):
        """Change how experts are used in evaluation and decoding (task flags call this)."""
        for layer in self.modules():
            if isinstance(layer, ExpertFFNMixin):
                spec = replace(layer.spec, inference_routing=mode, inference_expert=expert)
                validate_inference(spec)
                layer.spec = spec

    sentence_key_ids: Optional[Tensor] = None

    def set_sentence_keys(self, ids: Optional[Tensor]):
        """The ids of the batch's sentences (``sample["id"]``), or None: with them, evaluation and
        decoding draw each sentence's experts from its id and the seed, not from the batch it is
        in (the THOR tasks set them around every validation and decoding step)."""
        keys = None if ids is None else ids.detach().to("cpu", torch.long)
        self.sentence_key_ids = keys
        for layer in self.modules():
            if isinstance(layer, ExpertFFNMixin):
                layer.sentence_keys = keys

    def set_eval_capacity_factor(self, factor: Optional[float]):
        """Cap the Switch/GShard experts at ``factor`` x their even share when evaluating and
        decoding; None drops no token (task flags call this; THOR and hash layers have no cap)."""
        validate_eval_capacity_factor(factor)
        for layer in self.modules():
            if isinstance(layer, ExpertFFNMixin):
                layer.set_eval_capacity_factor(factor)

    def state_dict(self, *args, **kwargs):
        # Stock fairseq-train saves rank 0's state only: with experts sharded over ranks that
        # would silently drop every other rank's experts. fairseq-thor-train's trainer saves
        # each rank's share and sets `sharded_checkpoints`.
        if any(isinstance(m, ExpertParallelFFN) for m in self.modules()) and not getattr(
                self, "sharded_checkpoints", False):
            raise RuntimeError(
                "an --expert-parallel model must be trained with fairseq-thor-train (same flags as "
                "fairseq-train), which saves every rank's experts; stock fairseq-train would keep "
                "only rank 0's"
            )
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        # Name the real problem (another number of experts) before torch's shape-mismatch dump.
        for name, bank in self.named_modules():
            theirs = state_dict.get(f"{name}.weight") if isinstance(bank, ExpertLinear) else None
            if theirs is not None and (theirs.dim() != 3 or theirs.shape[0] != bank.num_experts):
                found = theirs.shape[0] if theirs.dim() == 3 else 1
                raise ThorError(
                    f"checkpoint has {found} expert(s) in {name} but this model was built with "
                    f"--num-experts {bank.num_experts}; load it with its own number of experts "
                    f"(drop --num-experts or the num_experts model override)"
                )
        return super().load_state_dict(state_dict, strict=strict, model_cfg=model_cfg, args=args)
