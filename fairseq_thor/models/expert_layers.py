"""THOR transformer layers: fairseq's encoder/decoder layers whose FFN is a bank of E experts.

Nothing of fairseq's ``forward`` is rewritten. ``build_fc1`` / ``build_fc2`` return expert banks,
and ``forward`` draws the route for this call, hands it to the banks and calls ``super().forward``,
so residuals, normalisation, dropout and return types stay fairseq's. With expert k routed, a
layer is numerically a vanilla fairseq layer holding expert k's FFN weights.
"""
from typing import Dict, Optional

from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor

from ..modules.experts import ExpertLinear, routed
from ..modules.routing import PER_SENTENCE_MODES, Route, draw_sentence_experts, make_route
from .expert_options import ExpertSpec


class ExpertFFNMixin:
    """Builds the FFN as two expert banks and routes each call. Needs ``self.spec`` before
    ``super().__init__`` runs, because fairseq builds fc1/fc2 inside its constructor."""

    spec: ExpertSpec

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        if q_noise > 0:
            raise ValueError("--quant-noise-pq is not supported on THOR expert layers")
        return ExpertLinear(self.spec.num_experts, input_dim, self.spec.ffn_dim or output_dim,
                            dispatches=True)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        return ExpertLinear(self.spec.num_experts, self.spec.ffn_dim or input_dim, output_dim,
                            dispatches=False)

    @property
    def routing_mode(self) -> str:
        return self.spec.train_routing if self.training else self.spec.inference_routing

    def make_route(self, x: Tensor, sentence_experts: Optional[Tensor] = None) -> Route:
        seq_len, batch_size = x.shape[0], x.shape[1]  # x: T x B x C
        return make_route(self.routing_mode, self.spec.num_experts, seq_len, batch_size, x.device,
                          fixed_expert=self.spec.inference_expert,
                          sentence_experts=sentence_experts)


class ThorTransformerEncoderLayer(ExpertFFNMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, spec: ExpertSpec, return_fc: bool = False):
        self.spec = spec
        super().__init__(cfg, return_fc=return_fc)

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        with routed(self.make_route(x), self.fc1, self.fc2):
            return super().forward(x, encoder_padding_mask, attn_mask=attn_mask)


@with_incremental_state
class ThorTransformerDecoderLayer(ExpertFFNMixin, TransformerDecoderLayerBase):
    """In incremental decoding a per-sentence draw is made at the first step, stored in the
    incremental state and reordered with the beam, so a hypothesis keeps its expert(s) for the
    whole output (the reference implementation redraws at every step)."""

    def __init__(self, cfg, spec: ExpertSpec, no_encoder_attn: bool = False,
                 add_bias_kv: bool = False, add_zero_attn: bool = False):
        self.spec = spec
        super().__init__(cfg, no_encoder_attn=no_encoder_attn, add_bias_kv=add_bias_kv,
                         add_zero_attn=add_zero_attn)
        scale_fc_width = getattr(self.ffn_layernorm, "normalized_shape", None)
        if scale_fc_width is not None and spec.ffn_dim is not None and scale_fc_width[0] != spec.ffn_dim:
            raise ValueError("--scale-fc needs --decoder-expert-ffn-dim equal to --decoder-ffn-embed-dim")

    def forward(self, x, encoder_out=None, encoder_padding_mask=None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                *args, **kwargs):
        route = self.make_route(x, self._stored_sentence_experts(x, incremental_state))
        with routed(route, self.fc1, self.fc2):
            return super().forward(x, encoder_out, encoder_padding_mask, incremental_state,
                                   *args, **kwargs)

    def _stored_sentence_experts(self, x: Tensor, incremental_state) -> Optional[Tensor]:
        if incremental_state is None or self.routing_mode not in PER_SENTENCE_MODES:
            return None
        saved = self.get_incremental_state(incremental_state, "route")
        if saved is None:
            experts = draw_sentence_experts(self.routing_mode, self.spec.num_experts, x.size(1))
            self.set_incremental_state(incremental_state, "route", {"experts": experts})
            return experts
        return saved["experts"]

    def reorder_incremental_state(self, incremental_state, new_order: Tensor):
        """Called by fairseq's decoder when beam search reorders or prunes hypotheses."""
        saved = self.get_incremental_state(incremental_state, "route")
        if saved is not None and saved["experts"] is not None:
            experts = saved["experts"].index_select(0, new_order.to(saved["experts"].device))
            self.set_incremental_state(incremental_state, "route", {"experts": experts})
