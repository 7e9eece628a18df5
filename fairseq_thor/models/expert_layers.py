"""THOR transformer layers: fairseq's encoder/decoder layers whose FFN is a bank of E experts.

Nothing of fairseq's ``forward`` is rewritten. ``build_fc1`` / ``build_fc2`` return expert banks,
and ``forward`` draws the route for this call, hands it to the banks and calls ``super().forward``,
so residuals, normalisation, dropout and return types stay fairseq's. With expert k routed, a
layer is numerically a vanilla fairseq layer holding expert k's FFN weights.

With ``--expert-parallel`` the FFN slot holds an ``ExpertParallelFFN`` instead (this process's
share of the experts behind fairscale's MOELayer) and the route is a balanced random draw.
"""
from dataclasses import replace
from typing import Dict, Optional

import torch
from fairseq.incremental_decoding_utils import with_incremental_state
from fairseq.modules.transformer_layer import (
    TransformerDecoderLayerBase,
    TransformerEncoderLayerBase,
)
from torch import Tensor, nn

from ..modules.expert_parallel_ffn import ExpertParallelFFN, random_decision
from ..errors import ThorError
from ..modules.experts import ExpertLinear, routed
from ..modules.gate_decision import GateDecision
from ..modules.gates import HashGate, SwitchGate, Top2Gate
from ..modules.routing import (
    PATH_SALT,
    PER_SENTENCE_MODES,
    Route,
    RouteKind,
    draw_balanced_experts,
    draw_sentence_experts,
    keyed_sentence_experts,
    make_route,
    route_from_choices,
)
from .expert_options import ExpertSpec


LEARNED_GATES = {"switch": SwitchGate, "gshard": Top2Gate}


def _identity(x: Tensor) -> Tensor:
    return x


class ExpertFFNMixin:
    """Builds the FFN as two expert banks and routes each call. Needs ``self.spec`` before
    ``super().__init__`` runs, because fairseq builds fc1/fc2 inside its constructor."""

    spec: ExpertSpec
    # Evaluation and decoding key THOR's per-sentence draws by sentence id (set by the model for
    # each batch, see ThorTransformerModel.set_sentence_keys) and by layer (``route_salt``).
    sentence_keys: Optional[Tensor] = None
    route_salt: int = 0
    # THOR's training draws, rows per expert of each layer call since the criterion last looked
    # (criterions/router_stats.py logs the largest share, as it does for the gated routers)
    draw_counts: Optional[list] = None

    def build_fc1(self, input_dim, output_dim, q_noise, qn_block_size):
        if q_noise > 0:
            raise ThorError("--quant-noise-pq is not supported on THOR expert layers")
        ffn_dim = self.spec.ffn_dim or output_dim
        self._build_gate(input_dim)
        fc1 = ExpertLinear(self.spec.num_experts, input_dim, ffn_dim, dispatches=True)
        if not self.spec.expert_parallel:
            return fc1
        # Expert parallelism runs the whole FFN inside fairscale's MOELayer, from the fc1 slot;
        # fc2 is built here, in the same order as build_fc2 would, so the initialisation
        # matches a one-process model with the same seed.
        fc2 = ExpertLinear(self.spec.num_experts, ffn_dim, input_dim, dispatches=False)
        return ExpertParallelFFN(fc1, fc2, self.activation_fn, self.activation_dropout_module)

    def build_fc2(self, input_dim, output_dim, q_noise, qn_block_size):
        if self.spec.expert_parallel:
            return nn.Identity()  # fc2 runs inside ExpertParallelFFN
        return ExpertLinear(self.spec.num_experts, self.spec.ffn_dim or input_dim, output_dim,
                            dispatches=False)

    def _build_gate(self, model_dim: int):
        """Baseline routers only (THOR has no gate). Their decisions are kept for the criterion."""
        spec = self.spec
        self.last_decision = None
        self.token_ids: Optional[Tensor] = None  # hash routing: token id of every row, set per call
        if spec.router in LEARNED_GATES:
            self.gate = LEARNED_GATES[spec.router](model_dim, spec.num_experts,
                                                   spec.capacity_factor, spec.eval_capacity_factor)
        elif spec.router == "hash":
            self.gate = HashGate(spec.num_experts, spec.vocab_size)

    def set_eval_capacity_factor(self, factor: Optional[float]):
        """The learned gates' capacity factor outside training (None: no cap)."""
        self.spec = replace(self.spec, eval_capacity_factor=factor)
        if self.spec.router in LEARNED_GATES:
            self.gate.eval_capacity_factor = factor

    def _router_decision(self, rows: Tensor, pad_rows: Optional[Tensor]):
        """A baseline router's decision for the non-padding rows (padding takes no capacity);
        returns it with the indices of those rows (None: all rows). Kept for the criterion."""
        keep = None
        if pad_rows is not None:
            keep = (~pad_rows.t().reshape(-1)).nonzero().squeeze(1).to(rows.device)  # B x T -> rows
        inputs = self.token_ids if self.spec.router == "hash" else rows
        if keep is not None:
            inputs = inputs.index_select(0, keep.to(inputs.device))
        self.last_decision = self.gate(inputs)
        return self.last_decision, keep

    def _gated_route(self, pad_rows: Optional[Tensor]) -> Route:
        def decide(rows: Tensor) -> Route:
            decision, keep = self._router_decision(rows, pad_rows)
            return route_from_choices(decision.experts, decision.weights, self.spec.num_experts,
                                      rows=keep)

        return Route(kind=RouteKind.GATED, decide=decide)

    def _expert_parallel_decision(self, rows: Tensor, pad_rows: Optional[Tensor]) -> GateDecision:
        decision, keep = self._router_decision(rows, pad_rows)
        if keep is None:
            return decision
        choices = decision.experts.size(1)
        experts = decision.experts.new_full((rows.size(0), choices), -1)
        weights = decision.weights.new_zeros((rows.size(0), choices))
        experts[keep], weights[keep] = decision.experts, decision.weights
        return replace(decision, experts=experts, weights=weights)

    def _hand_ffn_to_experts(self):
        """Expert parallelism: activation and its dropout now run inside the experts."""
        if self.spec.expert_parallel:
            self.activation_fn = _identity
            self.activation_dropout_module = nn.Identity()

    def routing(self, x: Tensor, sentence_experts: Optional[Tensor] = None,
                pad_rows: Optional[Tensor] = None):
        """Context manager that routes this layer call (x: T x B x C; pad_rows: B x T)."""
        gated = self.spec.router != "stochastic"
        if not self.spec.expert_parallel:
            if gated:
                return routed(self._gated_route(pad_rows), self.fc1, self.fc2)
            return routed(self.make_route(x, sentence_experts), self.fc1, self.fc2)
        if gated:
            return self.fc1.decided_by(lambda rows: self._expert_parallel_decision(rows, pad_rows))
        seq_len, batch_size = x.shape[0], x.shape[1]
        mode = self.routing_mode
        if mode == "fixed":
            experts = torch.full((seq_len, batch_size), self.spec.inference_expert, dtype=torch.long)
        else:
            experts = draw_balanced_experts(mode, self.spec.num_experts, seq_len, batch_size)
        self._count_draws(torch.bincount(experts.reshape(-1), minlength=self.spec.num_experts).tolist())
        return self.fc1.decided_by(
            lambda rows: random_decision(experts, self.spec.num_experts, rows.device))

    @property
    def routing_mode(self) -> str:
        return self.spec.train_routing if self.training else self.spec.inference_routing

    def keyed_sentence_experts(self, batch_size: int) -> Optional[Tensor]:
        """The sentences' experts from their ids, when evaluating with sentence routing and ids
        are known; None otherwise (the draw is then torch's). Beam search runs ``beam`` rows per
        sentence, one sentence after the other: every hypothesis of a sentence gets its experts."""
        keys = self.sentence_keys
        if (keys is None or self.training or self.routing_mode not in ("sentence", "path")
                or self.spec.router != "stochastic"):
            return None
        if batch_size % len(keys):
            raise RuntimeError(f"{batch_size} rows for {len(keys)} sentence ids: not one block per sentence")
        salt = PATH_SALT if self.routing_mode == "path" else self.route_salt  # path: one for all layers
        return keyed_sentence_experts(keys.repeat_interleave(batch_size // len(keys)), salt,
                                      torch.initial_seed(), self.spec.num_experts)

    def make_route(self, x: Tensor, sentence_experts: Optional[Tensor] = None) -> Route:
        seq_len, batch_size = x.shape[0], x.shape[1]  # x: T x B x C
        if sentence_experts is None:
            sentence_experts = self.keyed_sentence_experts(batch_size)
        route = make_route(self.routing_mode, self.spec.num_experts, seq_len, batch_size, x.device,
                           fixed_expert=self.spec.inference_expert,
                           sentence_experts=sentence_experts)
        if route.kind is RouteKind.ONE:
            counts = [0] * self.spec.num_experts
            counts[route.expert] = seq_len * batch_size
            self._count_draws(counts)
        elif route.kind is RouteKind.GROUPED:
            self._count_draws(route.counts)
        return route

    def _count_draws(self, counts):
        if self.training:  # what training routing gives each expert; evaluation is not logged
            # the last few calls only: a criterion that never reads them must not grow this list
            self.draw_counts = ((self.draw_counts or []) + [counts])[-16:]


class ThorTransformerEncoderLayer(ExpertFFNMixin, TransformerEncoderLayerBase):
    def __init__(self, cfg, spec: ExpertSpec, return_fc: bool = False):
        self.spec = spec
        super().__init__(cfg, return_fc=return_fc)
        self._hand_ffn_to_experts()

    def forward(self, x, encoder_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor] = None):
        with self.routing(x, pad_rows=encoder_padding_mask):
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
            raise ThorError("--scale-fc needs --decoder-expert-ffn-dim equal to --decoder-ffn-embed-dim")
        if spec.expert_parallel and self.ffn_layernorm is not None:
            raise ThorError("--scale-fc is not supported with --expert-parallel")
        self._hand_ffn_to_experts()

    def forward(self, x, encoder_out=None, encoder_padding_mask=None,
                incremental_state: Optional[Dict[str, Dict[str, Optional[Tensor]]]] = None,
                *args, **kwargs):
        if incremental_state is not None and self.spec.expert_parallel:
            raise ThorError(
                "an --expert-parallel model cannot decode step by step across processes; "
                "consolidate its checkpoint with fairseq-thor-consolidate and decode on one device"
            )
        with self.routing(x, self._stored_sentence_experts(x, incremental_state),
                          pad_rows=kwargs.get("self_attn_padding_mask")):
            return super().forward(x, encoder_out, encoder_padding_mask, incremental_state,
                                   *args, **kwargs)

    def _stored_sentence_experts(self, x: Tensor, incremental_state) -> Optional[Tensor]:
        if (incremental_state is None or self.routing_mode not in PER_SENTENCE_MODES
                or self.spec.router != "stochastic"):
            return None
        saved = self.get_incremental_state(incremental_state, "route")
        if saved is None:
            experts = self.keyed_sentence_experts(x.size(1))
            if experts is None:
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
