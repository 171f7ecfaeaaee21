"""Training across processes under ``torchrun``, on torchrec's DistributedModelParallel.

:func:`world` tells a process its rank and device, starting the process group (nccl on GPUs,
gloo on CPU) when ``torchrun`` launched more than one process. :func:`shard` wraps a module
so that its embedding tables are sharded table-wise by torchrec's planner and everything
else is data-parallel. :func:`gather_state` and :func:`load_state` turn sharded state into
whole tensors and back, so a checkpoint written by one world size loads into any other.

A trainer holds one :class:`Replica` (:func:`replica`), which hides the world size: under
``torchrun`` a :class:`ShardedReplica` shards the module it trains and runs the collectives;
in a single process a :class:`Replica` trains the module as it is and every collective is the
identity.

Without ``torchrun`` (or with one process) nothing here starts a process group and every
collective helper is a no-op.
"""

from __future__ import annotations

import atexit
import copy
import gc
import json
import logging
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import ShardMetadata
from torchrec import (
    EmbeddingBagCollection,
    EmbeddingBagConfig,
    EmbeddingCollection,
    EmbeddingConfig,
)
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.distributed.types import ShardingEnv, ShardingType

from recdistill import devices

# Rank 0 evaluates after every epoch while the other ranks wait in a collective.
COLLECTIVE_TIMEOUT = timedelta(hours=2)
# fbgemm's fused embedding kernel needs table widths that are a multiple of this.
FUSED_WIDTH_MULTIPLE = 4
# Share of each device's memory the planner keeps for everything but the sharded tables.
STORAGE_RESERVATION = 0.15

# Warnings torchrec and fbgemm print for this set-up that ask nothing of the user: the
# replicated narrow tables have no sharding spec and no cache; fbgemm's dense look-up
# backpropagates through its own autograd function (its gradients equal
# nn.EmbeddingBag's); DistributedModelParallel still hands out ShardedTensor state and
# sets DDP's broadcast_buffers itself.
_NOISE = (
    "Sharding spec not found for ",
    "Sharding Type is data_parallel, caching params will be ignored",
    "fbgemm::dense_embedding_codegen_lookup_function: an autograd kernel was not registered",
    "Please use DTensor instead and we are deprecating ShardedTensor",
    "`broadcast_buffers` is deprecated",
)


@dataclass(frozen=True)
class World:
    """This process's place in the job: rank ``rank`` of ``size``, computing on ``device``."""

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def world() -> World:
    """The job this process belongs to, on the process's device (:mod:`recdistill.devices`:
    a GPU of its own per rank under ``torchrun``), joining its process group on first use."""
    device = devices.resolve()
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return World(device=device)
    _quiet_known_noise()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT
        )
        atexit.register(_leave)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), device=device)


def _quiet_known_noise() -> None:
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=re.escape(message))
    noise = _DropMessages()
    for logger in (logging.getLogger(), logging.getLogger("torchrec.distributed.utils")):
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(noise)


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(_NOISE)


def _leave() -> None:
    # Free what still holds the group (sharded modules, DDP's reducer, their last work) and
    # destroy it while the interpreter is whole: left to interpreter shutdown, gloo's
    # teardown aborts the process now and then.
    gc.collect()
    dist.destroy_process_group()


def shard(
    module: nn.Module,
    world: World,
    *,
    learning_rate: float,
    adagrad_learning_rate: float,
    weight_decay: float,
) -> DistributedModelParallel:
    """``module`` with its embedding tables sharded table-wise and the rest data-parallel.

    Both kinds of torchrec collection are sharded: pooled bags (``EmbeddingBagCollection``)
    and unpooled sequences (``EmbeddingCollection``). Sharded tables run fbgemm's fused
    kernel, which applies the optimizer to the rows a batch touched inside the backward
    pass: Adam at ``learning_rate`` on GPUs; fbgemm's CPU kernel has no Adam, so on CPU the
    rows learn with exact row-wise Adagrad at ``adagrad_learning_rate``. A table whose width
    is not a multiple of 4 (the kernel's limit) stays replicated and learns with the dense
    parameters (a sequence collection holding one stays an ordinary module). Sharding
    happens in place: pass a copy to keep ``module``.
    """
    weights = {name: value.detach().clone() for name, value in module.state_dict().items()}
    fused_params = {
        **(
            {"optimizer": EmbOptimType.ADAM, "learning_rate": learning_rate}
            if world.device.type == "cuda"
            else {
                "optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD,
                "learning_rate": adagrad_learning_rate,
            }
        ),
        "weight_decay": weight_decay,
    }
    sharders = [
        EmbeddingBagCollectionSharder(fused_params=fused_params),
        EmbeddingCollectionSharder(fused_params=fused_params),
    ]
    topology = TopologyFactory.create_topology(
        TrainerConfig(
            world_size=world.size,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world.size)),
        ),
        kernel_config=KernelConfig(compute_device=world.device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology,
        constraints=_constraints(module),
        storage_reservation=FixedPercentageStorageReservation(STORAGE_RESERVATION),
    )
    group = dist.GroupMember.WORLD
    plan = planner.collective_plan(module, sharders, group)
    # torchrec looks up a replicated sequence table with fbgemm's dense kernel, which on CPU
    # returns it pooled ([batch, width], not a row per item): a sequence collection the
    # fused kernel cannot take is left out of the plan, an ordinary module that DDP
    # replicates like the MLPs.
    for path, collection in module.named_modules():
        if isinstance(collection, EmbeddingCollection) and not all(
            _fused(table) for table in collection.embedding_configs()
        ):
            plan.plan.pop(path, None)
    sharded = DistributedModelParallel(
        module,
        env=ShardingEnv.from_process_group(group),
        device=world.device,
        sharders=sharders,
        plan=plan,
    )
    # The sharded tables start from fresh random rows: give them the module's own.
    load_state(sharded.state_dict(), weights)
    return sharded


def _constraints(module: nn.Module) -> dict[str, ParameterConstraints]:
    """Each table's placement, keyed by table name as torchrec's planner looks them up."""
    constraints: dict[str, ParameterConstraints] = {}
    for collection in module.modules():
        if isinstance(collection, EmbeddingBagCollection):
            tables = collection.embedding_bag_configs()
        elif isinstance(collection, EmbeddingCollection):
            tables = collection.embedding_configs()
        else:
            continue
        for table in tables:
            placement = _placement(table)
            if constraints.setdefault(table.name, placement) != placement:
                # The planner matches constraints by table name alone.
                raise ValueError(f"two tables named {table.name!r} need different placements")
    return constraints


def _fused(table: EmbeddingBagConfig | EmbeddingConfig) -> bool:
    return table.embedding_dim % FUSED_WIDTH_MULTIPLE == 0


def _placement(table: EmbeddingBagConfig | EmbeddingConfig) -> ParameterConstraints:
    if _fused(table):
        return ParameterConstraints(
            sharding_types=[ShardingType.TABLE_WISE.value],
            compute_kernels=[EmbeddingComputeKernel.FUSED.value],
        )
    return ParameterConstraints(
        sharding_types=[ShardingType.DATA_PARALLEL.value],
        compute_kernels=[EmbeddingComputeKernel.DENSE.value],
    )


def fused_optimizer_state(sharded: DistributedModelParallel) -> dict[str, torch.Tensor]:
    """The fused kernel's optimizer state (e.g. Adagrad's or Adam's moments) of this rank's
    tables, flat: ``"<parameter>.<state>"``, sharded tensors viewing the live state."""
    return {
        f"{parameter}.{key}": value
        for parameter, entries in sharded.fused_optimizer.state_dict()["state"].items()
        for key, value in entries.items()
        if isinstance(value, torch.Tensor)
    }


def gather_state(local: Mapping[str, Any], world: World) -> dict[str, torch.Tensor]:
    """Every tensor of a state dict, whole and on CPU, on every rank.

    Keys may differ between ranks (a fused optimizer lists only its own rank's tables). A
    sharded tensor is rebuilt by summing each rank's zero-padded shards (shards never
    overlap); any other tensor is taken from the lowest rank that holds it.
    """
    local = {key: value for key, value in local.items() if isinstance(value, torch.Tensor)}
    if not world.distributed:
        return {key: value.detach().cpu() for key, value in local.items()}
    described = {
        key: [
            list(value.size()),
            str(value.dtype).removeprefix("torch."),
            isinstance(value, ShardedTensor),
        ]
        for key, value in local.items()
    }
    everyone = all_gather_json(described, world)
    whole = {}
    for key in sorted(set().union(*everyone)):
        holders = [rank for rank, keys in enumerate(everyone) if key in keys]
        shape, dtype, sharded = everyone[holders[0]][key]
        tensor = torch.zeros(shape, dtype=getattr(torch, dtype), device=world.device)
        value = local.get(key)
        if sharded:
            for shard_ in [] if value is None else value.local_shards():
                tensor[_region(shard_.metadata)] = shard_.tensor.detach()
            dist.all_reduce(tensor)
        else:
            if world.rank == holders[0]:
                tensor.copy_(value.detach())
            dist.broadcast(tensor, src=holders[0])
        whole[key] = tensor.cpu()
    return whole


def load_state(local: Mapping[str, Any], whole: Mapping[str, torch.Tensor]) -> None:
    """Copy whole tensors into a state dict's tensors in place; each rank fills its shards."""
    with torch.no_grad():
        for key, value in local.items():
            if isinstance(value, ShardedTensor):
                for shard_ in value.local_shards():
                    shard_.tensor.copy_(whole[key][_region(shard_.metadata)])
            elif isinstance(value, torch.Tensor):
                value.copy_(whole[key])


def _region(metadata: ShardMetadata) -> tuple[slice, ...]:
    return tuple(
        slice(offset, offset + size)
        for offset, size in zip(metadata.shard_offsets, metadata.shard_sizes)
    )


def broadcast_json(value: Any, world: World) -> Any:
    """Rank 0's ``value`` (anything JSON can hold) on every rank."""
    if not world.distributed:
        return value
    payload = json.dumps(value).encode() if world.is_main else b""
    size = torch.tensor([len(payload)], device=world.device)
    dist.broadcast(size, src=0)
    buffer = _bytes_tensor(payload, int(size), world)
    dist.broadcast(buffer, src=0)
    return json.loads(bytes(buffer.cpu().tolist()))


def all_gather_json(value: Any, world: World) -> list[Any]:
    """Every rank's ``value`` (anything JSON can hold), in rank order."""
    payload = json.dumps(value).encode()
    sizes = [torch.zeros(1, dtype=torch.int64, device=world.device) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([len(payload)], device=world.device))
    longest = int(max(sizes))
    buffers = [_bytes_tensor(b"", longest, world) for _ in range(world.size)]
    dist.all_gather(buffers, _bytes_tensor(payload, longest, world))
    return [
        json.loads(bytes(buffer[: int(size)].cpu().tolist()))
        for buffer, size in zip(buffers, sizes)
    ]


def _bytes_tensor(payload: bytes, length: int, world: World) -> torch.Tensor:
    tensor = torch.zeros(length, dtype=torch.uint8)
    tensor[: len(payload)] = torch.tensor(list(payload), dtype=torch.uint8)
    return tensor.to(world.device)


class Replica:
    """This process's part in training one module, the world size hidden from the trainer.

    This class is a single process's: the module trains as it is, its weights are always
    whole and every collective is the identity. :class:`ShardedReplica` is a rank's under
    ``torchrun``.
    """

    def __init__(self, world: World) -> None:
        self.world = world

    @property
    def is_main(self) -> bool:
        """Whether this process evaluates and writes (rank 0)."""
        return self.world.is_main

    def global_batch(self, index: int) -> int:
        """The place of this rank's batch ``index`` among every rank's batches of an epoch."""
        return index * self.world.size + self.world.rank

    def wrap(self, module: nn.Module, **fused_optimizer: float) -> nn.Module:
        """The module to train in place of ``module``, which stays whole, both moved to this
        process's device: ``module`` itself. ``fused_optimizer`` holds the sharded tables'
        rates, as :func:`shard` takes them."""
        return module.to(self.world.device)

    def gather_weights(self, trained: nn.Module, whole: nn.Module) -> None:
        """Bring ``trained``'s current weights into ``whole``: they are already there."""

    def gather_fused_state(self, trained: nn.Module) -> dict[str, torch.Tensor]:
        """The fused kernel's optimizer state of ``trained``'s tables, whole: none, as no
        table is sharded."""
        return {}

    def restore(
        self, trained: nn.Module, whole: nn.Module, fused_state: Mapping[str, torch.Tensor]
    ) -> None:
        """Load ``whole``'s weights and the whole ``fused_state`` into ``trained``: its
        weights are ``whole``'s and it has no fused state."""

    def all_sum(self, values: list[float]) -> list[float]:
        """Element-wise sums of ``values`` over ranks."""
        return values

    def from_main(self, compute: Callable[[], Any]) -> Any:
        """``compute()``, run on rank 0 alone, on every rank (anything JSON can hold)."""
        return compute()

    def barrier(self) -> None:
        """Wait until every rank is here."""


class ShardedReplica(Replica):
    """A rank's part under ``torchrun``: the module trains sharded (:func:`shard`) and the
    collectives run over the process group."""

    def wrap(self, module: nn.Module, **fused_optimizer: float) -> nn.Module:
        # Sharding rebuilds modules in place: shard a copy and keep ``module`` whole.
        module.to(self.world.device)
        return shard(copy.deepcopy(module), self.world, **fused_optimizer)

    def gather_weights(self, trained: nn.Module, whole: nn.Module) -> None:
        whole.load_state_dict(gather_state(trained.state_dict(), self.world))

    def gather_fused_state(self, trained: nn.Module) -> dict[str, torch.Tensor]:
        return gather_state(fused_optimizer_state(trained), self.world)

    def restore(
        self, trained: nn.Module, whole: nn.Module, fused_state: Mapping[str, torch.Tensor]
    ) -> None:
        """Each rank fills its shards; fused state the checkpoint does not hold (a single
        process's holds none) starts afresh."""
        load_state(trained.state_dict(), whole.state_dict())
        fused = fused_optimizer_state(trained)
        load_state({k: v for k, v in fused.items() if k in fused_state}, fused_state)

    def all_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.world.device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def from_main(self, compute: Callable[[], Any]) -> Any:
        return broadcast_json(compute() if self.is_main else None, self.world)

    def barrier(self) -> None:
        dist.barrier()


def replica(world: World) -> Replica:
    """This process's :class:`Replica`: a sharded one when ``world`` has several processes."""
    return ShardedReplica(world) if world.distributed else Replica(world)
