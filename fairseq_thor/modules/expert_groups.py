"""Which processes exchange tokens, and which hold copies of the same experts.

With W processes and E experts, expert parallelism splits the ranks into *expert groups* of
S = min(W, E) consecutive ranks. Inside an expert group every expert lives exactly once (E/S on
each rank) and the all-to-all runs there. When W > E (W a multiple of E) there are W/E expert
groups, so each expert has W/E *replicas*: rank r holds the same experts as ranks r mod S, r mod S
+ S, ...; those form its replica group, over which the expert's gradient is summed (each replica
saw only its own expert group's tokens). This is the separation of the expert group from the
data-parallel group that Tutel and fairseq's MoE branch make; the shared parameters stay
data-parallel over all W ranks.

Checkpoints are written by the first expert group only (S rank files, each expert once); rank r
reads shard r mod S, so a save of W = S ranks and one of W = k*S ranks are the same files.
"""
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch.distributed as dist


@dataclass(frozen=True)
class ExpertGroups:
    world_size: int  # W: all data-parallel ranks
    rank: int
    num_shards: int  # S = min(W, E): ranks per expert group, and rank files per checkpoint
    expert_group: object  # the process group of this rank's expert group (WORLD when W <= E)
    replica_group: Optional[object]  # ranks holding this rank's experts; None when W <= E

    @property
    def shard(self) -> int:
        """Which slice of the experts this rank holds (and which rank file it reads)."""
        return self.rank % self.num_shards

    @property
    def num_replicas(self) -> int:
        return self.world_size // self.num_shards

    @property
    def writes_rank_file(self) -> bool:
        """Only the first expert group saves experts: the others hold identical copies."""
        return self.rank < self.num_shards


def compatible(num_experts: int, world_size: int) -> bool:
    """Expert parallelism needs W to divide E (E/W experts each) or E to divide W (replicas)."""
    return num_experts % world_size == 0 or world_size % num_experts == 0


def check_world_size(num_experts: int, world_size: int):
    if not compatible(num_experts, world_size):
        raise ValueError(
            f"--expert-parallel needs --num-experts ({num_experts}) to be a multiple or a divisor "
            f"of the world size ({world_size}): with W <= E each process holds E/W experts, with "
            f"W = k*E each expert lives on k processes; valid here: --num-experts "
            f"{', '.join(str(e) for e in valid_expert_counts(world_size))}, ..."
        )


def valid_expert_counts(world_size: int):
    divisors = [d for d in range(2, world_size + 1) if world_size % d == 0]
    return sorted(set(divisors + [2 * world_size, 3 * world_size]))


def num_shards(num_experts: int, world_size: int) -> int:
    check_world_size(num_experts, world_size)
    return min(num_experts, world_size)


# every rank must create every process group, in the same order; the layers of one model (and
# models rebuilt in one process) share them
_CACHE: Dict[Tuple[int, int, int], ExpertGroups] = {}


def expert_groups(num_experts: int) -> ExpertGroups:
    """This rank's groups in the default process group (created on first use, then reused)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError(
            "--expert-parallel needs a distributed run: launch one process per rank with "
            "--distributed-world-size W > 1 (see the README's expert parallelism section)"
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    shards = num_shards(num_experts, world)
    key = (id(dist.group.WORLD), world, shards)
    if key not in _CACHE:
        if shards == world:
            groups = ExpertGroups(world, rank, shards, dist.group.WORLD, None)
        else:
            expert_group = replica_group = None
            for first in range(0, world, shards):  # every rank takes part in every new_group
                group = dist.new_group(list(range(first, first + shards)))
                if first <= rank < first + shards:
                    expert_group = group
            for shard in range(shards):
                group = dist.new_group(list(range(shard, world, shards)))
                if rank % shards == shard:
                    replica_group = group
            groups = ExpertGroups(world, rank, shards, expert_group, replica_group)
        _CACHE[key] = groups
    return _CACHE[key]
