"""fairseq's Trainer, taught to save, load and clip an expert-parallel model.

Stock fairseq saves a checkpoint from rank 0 only and broadcasts it on load: with experts sharded
over ranks that would keep rank 0's experts and lose the others. Under ``--expert-parallel`` this
trainer has every rank of the first expert group save its experts (``checkpoint_X-rank-R.pt``) and
rank 0 the rest (``checkpoint_X-shared.pt``), and every rank load its own pair (rank r reads shard
r mod S; see ``modules/expert_groups.py``).

Expert gradients are brought to the scale of the shared ones: legacy_ddp divides the shared
gradients by W and sums them, and fairseq then multiplies everything by W / sample_size. An
expert's gradient already holds every token of its expert group (the all-to-all carries them
back), so it is divided by W too and summed over its replicas (W > E). Gradient clipping uses the
norm over every expert once plus the shared parameters, so every rank computes the same clipping
factor (fairseq's own clipping leaves experts out of the norm) and the trainer's cross-rank
consistency check holds. Without ``--expert-parallel`` it is fairseq's Trainer unchanged.
"""
import logging
import os
import tempfile
import uuid
from itertools import chain
from typing import List

import torch
import torch.distributed as dist
from fairseq import checkpoint_utils, utils
from fairseq.trainer import Trainer
from omegaconf import open_dict

from ..errors import ThorError
from . import sharded_checkpoint as shards
from ..modules.expert_groups import ExpertGroups, expert_groups
from ..modules.expert_parallel_ffn import expert_parameter_names

logger = logging.getLogger(__name__)

EXPERT_PARALLEL_DDP_BACKENDS = ("legacy_ddp", "no_c10d")


def check_expert_parallel_config(cfg):
    """Refuse settings under which expert parallelism would train wrongly, naming the fix."""
    backend = cfg.distributed_training.ddp_backend
    if backend not in EXPERT_PARALLEL_DDP_BACKENDS:
        raise ThorError(
            f"--expert-parallel needs --ddp-backend legacy_ddp (got {backend}): it is the backend "
            f"that leaves expert gradients (parameters tagged `expert`) out of the all-reduce"
        )
    if getattr(cfg.task, "eval_bleu", False):
        raise ThorError(
            "--eval-bleu decodes step by step, which an --expert-parallel model cannot do across "
            "processes (ranks would finish at different steps); validate on loss, and score BLEU "
            "after fairseq-thor-consolidate"
        )
    common = cfg.common
    if (common.fp16 or common.bf16) and not (common.memory_efficient_fp16 or
                                             common.memory_efficient_bf16 or
                                             common.fp16_no_flatten_grads):
        raise ThorError(
            "--expert-parallel with --fp16/--bf16 needs --fp16-no-flatten-grads (or "
            "--memory-efficient-fp16): fairseq's flattened fp32 master copy loses the `expert` "
            "tag, so expert gradients would be clipped as if they were shared"
        )


class ExpertParallelTrainer(Trainer):
    def __init__(self, cfg, task, model, criterion, quantizer=None):
        self.expert_parallel = bool(getattr(cfg.model, "expert_parallel", False))
        if self.expert_parallel:
            check_expert_parallel_config(cfg)
            with open_dict(cfg):
                # each rank reads its own files instead of receiving rank 0's
                cfg.checkpoint.load_checkpoint_on_all_dp_ranks = True
            model.sharded_checkpoints = True  # see ThorTransformerModel.state_dict
        super().__init__(cfg, task, model, criterion, quantizer)

    @property
    def expert_groups(self) -> ExpertGroups:
        return expert_groups(self.cfg.model.num_experts)  # made with the model; reused here

    # ---- file names -------------------------------------------------------------------------

    @property
    def checkpoint_suffix(self) -> str:
        suffix = super().checkpoint_suffix
        return f"{suffix}-rank-{self.expert_groups.shard}" if self.expert_parallel else suffix

    @property
    def should_save_checkpoint_on_current_rank(self) -> bool:
        if self.expert_parallel:
            return self.expert_groups.writes_rank_file
        return super().should_save_checkpoint_on_current_rank

    # ---- save / load ------------------------------------------------------------------------

    def _param_names(self) -> List[str]:
        """Names in the order of the optimizer's parameters (Trainer._build_optimizer's order)."""
        named = chain(self._model.named_parameters(),
                      (("criterion." + n, p) for n, p in self._criterion.named_parameters()))
        return [n for n, p in named if p.requires_grad]

    def save_checkpoint(self, filename, extra_state):
        if not self.expert_parallel:
            return super().save_checkpoint(filename, extra_state)
        state = utils.move_to_cpu(self.state_dict())
        state["extra_state"].update(extra_state)
        # one token for all files of this save, so a mixed set is detected at load time; only
        # the first expert group saves (should_save_checkpoint_on_current_rank)
        groups = self.expert_groups
        token = [uuid.uuid4().hex]
        dist.broadcast_object_list(token, src=0, group=groups.expert_group)
        rank = groups.shard
        prefix = shards.checkpoint_prefix(filename)
        rank_state, shared = shards.split_for_rank(
            state, self._param_names(), expert_parameter_names(self._model), rank,
            groups.num_shards, self.cfg.model.num_experts, token[0],
            os.path.basename(shards.shared_path(prefix)))
        logger.info(f"Saving rank {rank}'s experts to {os.path.abspath(filename)}")
        checkpoint_utils.torch_persistent_save(rank_state, filename)  # written atomically
        if shared is not None:
            for path in self._shared_paths(prefix):
                checkpoint_utils.torch_persistent_save(shared, path)
            self._remove_old_shared_files(filename)
        return os.path.abspath(filename)

    def _remove_old_shared_files(self, saving: str):
        cfg = self.cfg.checkpoint
        for path in shards.shared_files_to_remove(
                os.path.dirname(os.path.abspath(saving)), saving,
                cfg.keep_interval_updates, cfg.keep_interval_updates_pattern, cfg.keep_last_epochs):
            logger.info(f"Removing {path}: fairseq removes the rank files of that save")
            os.remove(path)

    def _shared_paths(self, prefix):
        """fairseq copies the rank files it saved to checkpoint_last (and best) but not the shared
        file; write checkpoint_last's own so the resume file never depends on another name."""
        paths = [shards.shared_path(prefix)]
        if not self.cfg.checkpoint.no_last_checkpoints:
            last = os.path.join(self.cfg.checkpoint.save_dir, "checkpoint_last" + super().checkpoint_suffix)
            if shards.shared_path(last) not in paths:
                paths.append(shards.shared_path(last))
        return paths

    def load_checkpoint(self, filename, reset_optimizer=False, reset_lr_scheduler=False,
                        optimizer_overrides=None, reset_meters=False):
        if not self.expert_parallel:
            return super().load_checkpoint(filename, reset_optimizer, reset_lr_scheduler,
                                           optimizer_overrides, reset_meters)
        rank, shards_here = self.expert_groups.shard, self.expert_groups.num_shards
        prefix = shards.checkpoint_prefix(filename)
        own = shards.rank_path(prefix, rank)
        # Every rank reads its files, then all ranks compare what they read before any of them
        # goes on: a rank that failed alone, or ranks holding different saves, would otherwise
        # leave the others blocked in the first collective of training, for ever.
        rank_state, shared, problem = None, None, None
        try:
            if os.path.isfile(own):
                rank_state = shards.load(own)
                if rank_state.get("expert_parallel", {}).get("world_size") == shards_here:
                    shared = shards.shared_for(prefix, rank_state)
                    shards.check_shard(shared, rank_state, rank, prefix)
        except (ThorError, OSError) as e:
            problem = str(e)
        saved = [None] * self.data_parallel_world_size
        dist.all_gather_object(saved, shards.save_summary(own, rank_state, problem),
                               group=self.data_parallel_process_group)
        if all(s is None for s in saved):
            if os.path.isfile(filename) and not os.path.isfile(shards.shared_path(prefix)):
                raise ThorError(
                    f"{filename} is a one-process checkpoint; split it for expert parallelism "
                    f"with: fairseq-thor-reshard {filename} --world-size "
                    f"{self.data_parallel_world_size} --out <prefix>"
                )
            return super().load_checkpoint(own, reset_optimizer, reset_lr_scheduler,
                                           optimizer_overrides, reset_meters)
        shards.check_ranks_agree(prefix, saved, shards_here)
        state = shards.merge_for_rank(shared, rank_state, self._param_names(),
                                      expert_parameter_names(self._model))
        # fairseq's loader reads a file: hand it this rank's merged state as one
        directory = os.path.dirname(os.path.abspath(filename))
        suffix = f".rank{self.data_parallel_rank}.pt"  # replicas read the same shard
        with tempfile.NamedTemporaryFile(dir=directory, suffix=suffix, delete=False) as f:
            torch.save(state, f)
        try:
            return super().load_checkpoint(f.name, reset_optimizer, reset_lr_scheduler,
                                           optimizer_overrides, reset_meters)
        finally:
            os.remove(f.name)

    # ---- gradient clipping ------------------------------------------------------------------

    def clip_grad_norm(self, clip_norm):
        if not self.expert_parallel:
            return super().clip_grad_norm(clip_norm)
        # fairseq's train_step calls this after all_reduce_grads and multiply_grads and before
        # the step, whatever --clip-norm is: the one place to finish the expert gradients. The
        # model's gradients: the fp16 ones under --fp16-no-flatten-grads, copied to fp32 below.
        reduce_expert_gradients(self.model.parameters(), self.expert_groups)
        # the optimizer's params: fp32 copies under --fp16-no-flatten-grads, still tagged
        add_experts = with_all_experts(list(self.optimizer.params), self.expert_groups.expert_group)
        return self.optimizer.clip_grad_norm(clip_norm, aggregate_norm_fn=add_experts)


def reduce_expert_gradients(params, groups: ExpertGroups):
    """Give expert gradients the scale legacy_ddp gives the shared ones (module docstring):
    divided by the world size, summed over the replicas of the expert (W > E)."""
    for p in params:
        if getattr(p, "expert", False) and p.grad is not None:
            p.grad.div_(groups.world_size)  # before the sum, as legacy_ddp, for fp16's range
            if groups.replica_group is not None:
                dist.all_reduce(p.grad, group=groups.replica_group)


def with_all_experts(params, group):
    """``aggregate_norm_fn`` for fairseq's ``clip_grad_norm_``, which measures only the shared
    (untagged) parameters: add the gradients of every expert of the expert group ``group`` (all
    experts once: replicas in other groups hold the same), so the norm is the one a single
    process holding all experts would compute, identical on every rank."""

    def aggregate(shared_norm: torch.Tensor) -> torch.Tensor:
        expert_sq = torch.zeros((), dtype=torch.float32, device=shared_norm.device)
        for p in params:
            if getattr(p, "expert", False) and p.grad is not None:
                expert_sq = expert_sq + p.grad.detach().float().pow(2).sum()
        dist.all_reduce(expert_sq, group=group)
        return (shared_norm.float() ** 2 + expert_sq).sqrt()

    return aggregate
