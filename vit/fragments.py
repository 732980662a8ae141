"""A rank's own part of the fp32 master weights under any ZeRO stage, as live views into its optimizer.

Each rank of a ZeRO-1/2/3 group holds the fp32 master copy of a slice of every parameter's flattened
elements; ZeRO-0 holds all of them on every rank. `local_fragments` names those slices
(`Fragment(name, offset, tensor)`) without copying, so something kept beside the weights (an EMA) can
follow them rank by rank with no collective, and `assemble` rebuilds full tensors from the pieces of any
set of ranks: the saved pieces of one world size load into another exactly. Take the fragments after any
checkpoint load: DeepSpeed re-links its views there.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from vit.engine import to_host, wait_for_host_copies
from vit.files import read_safetensors


@dataclass(frozen=True)
class Fragment:
    """Elements `offset .. offset + tensor.numel()` of parameter `name`, flattened (1-D `tensor`)."""

    name: str
    offset: int
    tensor: torch.Tensor


@dataclass(frozen=True)
class Fragments:
    """The pieces one rank holds; `replicated`: every rank holds all of them (ZeRO-0), so rank 0's
    pieces alone are the whole state and only rank 0 saves or sends them."""

    pieces: list[Fragment]
    replicated: bool

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self.pieces)

    def __len__(self) -> int:
        return len(self.pieces)

    def writes(self, rank: int) -> bool:
        """Whether `rank` saves its pieces: every rank, or rank 0 alone when they are replicated."""
        return rank == 0 or not self.replicated


def local_fragments(engine: Any) -> Fragments:
    """This rank's fp32 master weights as live views (an optimizer step changes them), named as in
    `engine.module.named_parameters()`."""
    stage = engine.zero_optimization_stage()
    if stage == 3:
        return Fragments(_zero3_fragments(engine), replicated=False)
    if stage in (1, 2):  # DeepSpeed's ZeRO optimizer or its BF16_Optimizer: both link `_hp_mapping`
        return Fragments(_linked_fragments(engine), replicated=False)
    return Fragments(_replicated_fragments(engine), replicated=True)


def parameter_shapes(engine: Any) -> dict[str, torch.Size]:
    """Every parameter's full shape (ZeRO-3 keeps it in `ds_shape`: the module's tensor is emptied)."""
    return {name: getattr(param, "ds_shape", param.shape) for name, param in engine.module.named_parameters()}


def _linked_fragments(engine: Any) -> list[Fragment]:
    """ZeRO-1/2 and BF16_Optimizer: each parameter's `_hp_mapping` (None where this rank's partition
    holds none of it) views the slice of the rank's flat fp32 partition that holds it."""
    pieces = []
    for name, param in engine.module.named_parameters():
        mapping = param._hp_mapping
        if mapping is not None:
            pieces.append(Fragment(name, mapping.lp_fragment_address.start, mapping.get_hp_fragment()))
    return pieces


def _zero3_fragments(engine: Any) -> list[Fragment]:
    """ZeRO-3: a parameter's partition on rank r is elements r * size .. (r + 1) * size of it (padded
    at the end), stored at `grad_position` in the rank's flat fp32 group, as DeepSpeed's own
    `_get_fp32_opt_state_partition` reads it; the padding is dropped."""
    optimizer = engine.optimizer
    pieces = []
    for name, param in engine.module.named_parameters():
        group, start, size = optimizer.grad_position[optimizer.get_param_id(param)]
        offset = optimizer._get_param_partition_rank(param) * size
        kept = min(size, param.ds_numel - offset)
        if kept > 0:
            flat = optimizer.fp32_partitioned_groups_flat[group]
            pieces.append(Fragment(name, offset, flat.narrow(0, start, kept)))
    return pieces


def _replicated_fragments(engine: Any) -> list[Fragment]:
    """ZeRO-0: the module's weights are the master weights, fp32 on every rank (vitpipe's bf16 runs them
    under autocast)."""
    pieces = []
    for name, param in engine.module.named_parameters():
        if param.dtype != torch.float32:
            raise ValueError(
                f"ZeRO-0 parameter {name} is {param.dtype}: no fp32 master weights to follow; "
                "train bf16 at ZeRO-0 under torch_autocast (vit.engine.precision_config) or use ZeRO >= 1"
            )
        pieces.append(Fragment(name, 0, param.detach().view(-1)))
    return pieces


def assemble(pieces: Iterable[Fragment], shapes: Mapping[str, Sequence[int]]) -> dict[str, torch.Tensor]:
    """Full fp32 CPU tensors of the parameters in `shapes` from the pieces of any ranks; every element
    must be in exactly one piece."""
    flat = {name: torch.empty(math.prod(shape), dtype=torch.float32) for name, shape in shapes.items()}
    spans: dict[str, list[tuple[int, int]]] = {name: [] for name in shapes}
    for piece in pieces:
        if piece.name not in flat:
            raise ValueError(
                f"a piece of {piece.name} (offset {piece.offset}): the model has no such parameter"
            )
        end = piece.offset + piece.tensor.numel()
        if piece.offset < 0 or end > flat[piece.name].numel():
            raise ValueError(
                f"a piece of {piece.name} covers elements {piece.offset}..{end}, "
                f"past its {flat[piece.name].numel()} elements: saved from another model?"
            )
        flat[piece.name][piece.offset : end].copy_(piece.tensor.detach().reshape(-1))
        spans[piece.name].append((piece.offset, end))
    for name, covered in spans.items():
        _refuse_gaps(name, sorted(covered), flat[name].numel())
    return {name: tensor.view(tuple(shapes[name])) for name, tensor in flat.items()}


def _refuse_gaps(name: str, spans: list[tuple[int, int]], numel: int) -> None:
    position = 0
    for start, end in [*spans, (numel, numel)]:
        if start < position:
            raise ValueError(
                f"{name}: elements {start}..{min(end, position)} are in two pieces; "
                "rank files of different checkpoints mixed?"
            )
        if start > position:
            raise ValueError(
                f"{name}: elements {position}..{start} of {numel} are in no piece; a rank's file is missing"
            )
        position = end


def save_fragments(path: str | Path, pieces: Iterable[Fragment]) -> Path:
    """One rank's pieces as a safetensors file, keys `NAME@OFFSET` (copied to the CPU)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # copies, not views: safetensors refuses tensors sharing memory, as pieces of one flat partition do
    state = {f"{piece.name}@{piece.offset}": piece.tensor.detach().to("cpu", copy=True) for piece in pieces}
    save_file(state, path)
    return path


def stage_fragments(pieces: Iterable[Fragment]) -> list[Fragment]:
    """Host copies of `pieces` (a checkpoint's, taken while training waits and written later): the live
    tensors go on changing, these do not."""
    pieces = list(pieces)
    staged = [Fragment(piece.name, piece.offset, to_host(piece.tensor)) for piece in pieces]
    wait_for_host_copies(piece.tensor.device for piece in pieces)
    return staged


def load_fragments(paths: Iterable[str | Path]) -> list[Fragment]:
    """The pieces of the rank files `paths`, on the CPU, for `assemble`."""
    pieces = []
    for path in paths:
        for key, tensor in read_safetensors(Path(path)).items():
            name, _, offset = key.rpartition("@")
            if not name or not offset.isdigit():
                raise ValueError(f"{path}: key {key!r} is not NAME@OFFSET; not a file of vit.fragments")
            pieces.append(Fragment(name, int(offset), tensor))
    return pieces


def gather_full(
    fragments: Fragments, shapes: Mapping[str, Sequence[int]], group: Any = None
) -> dict[str, torch.Tensor] | None:
    """A collective (every rank calls it): rank 0 gets the full fp32 state on the CPU, the others None.

    Every rank sends CPU copies of its pieces to rank 0 (`dist.gather_object` in `group`: under NCCL,
    `vit.device.object_group`'s gloo group, so the bytes stay off the GPUs); replicated pieces are whole
    on rank 0 already."""
    rank = dist.get_rank()
    if fragments.replicated:
        return assemble(fragments, shapes) if rank == 0 else None
    local = [Fragment(p.name, p.offset, p.tensor.detach().to("cpu", copy=True)) for p in fragments]
    gathered: list[list[Fragment]] | None = [[] for _ in range(dist.get_world_size())] if rank == 0 else None
    dist.gather_object(local, gathered, dst=0, group=group)
    return assemble(itertools.chain.from_iterable(gathered), shapes) if gathered is not None else None
