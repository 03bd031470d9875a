"""The S2D refresh across ranks (``torch.distributed``; a no-op in a single process).


* :func:`partition` gives every target layer one *owner* rank, balancing the spectral cost
  (Gram ``r^2 c`` + eigh ``r^3`` flops, ``r = min(m, n)``, ``c = max(m, n)``) with the greedy
  longest-processing-time rule. Every rank computes the same assignment from the layer shapes alone.
* :func:`global_peaks` combines the per-layer largest ``|activation|`` seen by each rank into the
  global one, and ships the input row ``x_j`` and neuron index ``i`` that produced it, so PCDR is
  evaluated on the same outlier a single process on the global batch would find.
* :func:`broadcast_from_owners` sends each layer's small payload (``U_k, σ_k, V_k``, ``k_target``,
  statistics) from its owner to every rank: one broadcast per (owner rank, dtype).
* :func:`gather_to_owner` materialises an FSDP2-sharded (``DTensor``, ``Shard(0)``) weight on its owner
  rank only, with a ``gather`` (each rank sends its rows to the owner; no rank but the owner receives
  the full matrix). :func:`local_rows` tells which rows of a weight this rank holds, so the penalty
  ``U_k[rows] diag(σ_k^p) V_kᵀ`` is formed for the local gradient shard only.

Depends on torch only.
"""
from __future__ import annotations

import heapq
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from s2d.regularizer.refresh import ActivationPeak, LayerRefresh
from s2d.spectral import Spectrum

logger = logging.getLogger(__name__)

__all__ = [
    "ShardedRefresh",
    "add_low_rank_",
    "low_rank_projections",
    "CommBytes",
    "broadcast_from_owners",
    "gather_to_owner",
    "global_peaks",
    "is_distributed",
    "local_rows",
    "partition",
    "rank_and_world",
    "refresh_comm_bytes",
    "refresh_cost",
]


# --------------------------------------------------------------------------- process group basics
def is_distributed() -> bool:
    """True when ``torch.distributed`` is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` when not distributed."""
    if not is_distributed():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def _comm_device(like: torch.device) -> torch.device:
    """Device the default backend communicates on (NCCL: the current CUDA device; gloo: CPU)."""
    backend = str(dist.get_backend()).lower()
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return like if like.type == "cpu" else torch.device("cpu")


# --------------------------------------------------------------------------- load balancing
def refresh_cost(shape: tuple[int, int]) -> float:
    """Flops of one refresh of an ``(m, n)`` weight: min-side Gram ``r²c`` plus eigh ``r³``."""
    m, n = int(shape[0]), int(shape[1])
    r, c = min(m, n), max(m, n)
    return float(r) * r * c + float(r) ** 3


def partition(shapes: Sequence[tuple[int, int]], world_size: int) -> list[int]:
    """Owner rank of every layer, balancing :func:`refresh_cost` (greedy LPT).

    Layers are taken in decreasing cost (ties: lower index first) and each goes to the currently
    least-loaded rank (ties: lower rank). Deterministic, so every rank derives the same answer.
    The result is within 4/3 of the optimal makespan (Graham's bound).
    """
    if world_size < 1:
        raise ValueError(f"partition: world_size must be >= 1, got {world_size}")
    order = sorted(range(len(shapes)), key=lambda i: (-refresh_cost(shapes[i]), i))
    heap = [(0.0, r) for r in range(world_size)]
    owners = [0] * len(shapes)
    for i in order:
        load, r = heapq.heappop(heap)
        owners[i] = r
        heapq.heappush(heap, (load + refresh_cost(shapes[i]), r))
    return owners


# --------------------------------------------------------------------------- activation peaks
def global_peaks(
    values: torch.Tensor, neurons: torch.Tensor, rows: Sequence[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Combine per-layer activation peaks across ranks.

    Args:
        values: ``(L,)`` float, this rank's largest ``|activation|`` per layer (``-inf`` if unseen).
        neurons: ``(L,)`` int64, the output index ``i`` of that activation.
        rows: ``L`` tensors, layer ``l``'s input row ``x_j`` of shape ``(n_l,)`` that produced it.

    Returns the global ``(values, neurons, rows)``: for each layer the largest value over all ranks,
    and the neuron and input row from the lowest rank that holds it. Four collectives in total
    (max, min, two sums); a single process returns its inputs unchanged.
    """
    if not is_distributed():
        return values, neurons, list(rows)
    rank, world = rank_and_world()
    dev = _comm_device(values.device)
    local = values.detach().to(dev, torch.float64)
    peak = local.clone()
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    holder = torch.where(local == peak, torch.full_like(local, rank), torch.full_like(local, world))
    dist.all_reduce(holder, op=dist.ReduceOp.MIN)
    mine = (holder == rank).cpu().tolist()
    # Sums of buffers that are zero everywhere but on the holder are exact copies.
    idx = torch.where(holder.to(neurons.device) == rank, neurons, torch.zeros_like(neurons)).to(dev)
    dist.all_reduce(idx, op=dist.ReduceOp.SUM)
    dtype = torch.float32
    for r in rows:
        dtype = torch.promote_types(dtype, r.dtype)
    flat = torch.zeros(sum(r.numel() for r in rows), dtype=dtype, device=dev)
    offset = 0
    for r, own in zip(rows, mine):
        if own:
            flat[offset : offset + r.numel()] = r.detach().reshape(-1).to(dev, dtype)
        offset += r.numel()
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    out_rows, offset = [], 0
    for r in rows:
        out_rows.append(flat[offset : offset + r.numel()].view_as(r).to(r.device, r.dtype))
        offset += r.numel()
    return peak.to(values.device, values.dtype), idx.to(neurons.device), out_rows


# --------------------------------------------------------------------------- factor broadcast
def broadcast_from_owners(payloads: Sequence[Sequence[torch.Tensor]], owners: Sequence[int]) -> None:
    """Copy every layer's payload tensors from its owner rank to all ranks, in place.

    ``payloads[l]`` is a list of tensors whose shapes and dtypes are the same on every rank (the
    owner filled them; the others allocated them). Tensors of one owner and dtype travel as one
    flat buffer, so a refresh costs at most ``world_size × #dtypes`` broadcasts.
    """
    if not is_distributed():
        return
    if len(payloads) != len(owners):
        raise ValueError(f"broadcast_from_owners: {len(payloads)} payloads but {len(owners)} owners")
    rank, world = rank_and_world()
    for src in range(world):
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for payload, owner in zip(payloads, owners):
            if owner == src:
                for t in payload:
                    groups.setdefault(t.dtype, []).append(t)
        for dtype, tensors in sorted(groups.items(), key=lambda kv: str(kv[0])):
            dev = _comm_device(tensors[0].device)
            if rank == src:
                flat = torch.cat([t.detach().reshape(-1).to(dev) for t in tensors])
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=dev)
            dist.broadcast(flat, src=src)
            if rank != src:
                offset = 0
                for t in tensors:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()


@dataclass
class CommBytes:
    """Bytes one distributed refresh moves, summed over the ranks that receive them."""

    factors: int  # U_k, σ_k, V_k tensors (upper bound: k = k_max for every layer)
    peaks: int  # input rows x_j in the activation all-reduce, per rank
    gather_fsdp: int  # FSDP2 only: weight rows sent to their owner
    layers: int


def refresh_comm_bytes(
    shapes: Sequence[tuple[int, int]], k_max: int, world_size: int, itemsize: int = 4
) -> CommBytes:
    """Communication volume of one distributed refresh (see ``docs/distributed.md``).

    Each penalised layer's owner broadcasts ``k (m + n + 1)`` factor elements (``k <= k_max``) that
    the other ``world_size - 1`` ranks receive. The activation all-reduce carries one input row
    (``n`` elements) per layer. Under FSDP2 the rows of each weight held outside its owner,
    ``(world-1)/world`` of ``m n`` elements, travel to the owner once. Per-layer stats (a pickled
    :class:`~s2d.regularizer.refresh.LayerStats`, a few hundred bytes) are not counted.
    """
    receivers = max(world_size - 1, 0)
    return CommBytes(
        factors=sum(k_max * (m + n + 1) * itemsize for m, n in shapes) * receivers,
        peaks=sum(n for _, n in shapes) * itemsize,
        gather_fsdp=sum(m * n * itemsize * receivers // max(world_size, 1) for m, n in shapes),
        layers=len(shapes),
    )


# --------------------------------------------------------------------------- sharded refresh
class ShardedRefresh:
    """The collectives around one distributed refresh of a fixed list of target layers.

    ``snapshot`` (before the spectral work) makes the activation peaks global and collects each weight
    on its owner; the caller then runs :func:`s2d.regularizer.refresh.compute_refresh` on the layers it owns;
    ``share`` (after) sends every owner's results to all ranks. Every rank must call both, in the same
    order, for the same layers. In a single process both are identities (``owners`` all 0).
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[tuple[int, int]]) -> None:
        self.names = list(names)
        self.shapes = [(int(m), int(n)) for m, n in shapes]
        self.rank, self.world = rank_and_world()
        self.owners = partition(self.shapes, self.world)

    def mine(self) -> list[str]:
        """Names of the layers this rank decomposes."""
        return [n for n, o in zip(self.names, self.owners) if o == self.rank]

    def snapshot(self, weights: Mapping[str, torch.Tensor], peaks: Mapping[str, ActivationPeak | None],
                 clone: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, ActivationPeak | None]]:
        """This rank's share: ``(weights, peaks)`` of the layers it owns, peaks global over ranks.

        ``weights`` may be FSDP2 DTensors (gathered to their owner). ``peaks`` maps a name to an
        :class:`~s2d.regularizer.refresh.ActivationPeak` or None (nothing captured on this rank).
        ``clone`` copies the weights, for work that runs while training goes on.
        """
        values, neurons, rows = [], [], []
        for name, (_, n) in zip(self.names, self.shapes):
            p = peaks.get(name)
            v = float(p.max_abs) if p is not None else -math.inf
            values.append(v if (p is None or math.isfinite(v)) else math.inf)  # non-finite wins, as locally
            neurons.append(int(p.neuron) if p is not None else 0)
            rows.append(p.x.detach().reshape(-1) if p is not None else torch.zeros(n))
        val_t, idx_t, rows = global_peaks(torch.tensor(values, dtype=torch.float64),
                                          torch.tensor(neurons, dtype=torch.int64), rows)
        own_w: dict[str, torch.Tensor] = {}
        own_p: dict[str, ActivationPeak | None] = {}
        for i, (name, owner) in enumerate(zip(self.names, self.owners)):
            full = gather_to_owner(weights[name], owner)  # collective under FSDP2: every rank calls it
            if owner != self.rank:
                continue
            own_w[name] = full.clone() if clone else full
            v = float(val_t[i])
            own_p[name] = None if v == -math.inf else ActivationPeak(
                torch.tensor(v, dtype=torch.float64), rows[i], idx_t[i].clone())
        return own_w, own_p

    def share(self, local: Mapping[str, LayerRefresh]) -> dict[str, LayerRefresh]:
        """All layers' :class:`~s2d.regularizer.refresh.LayerRefresh` on every rank, from each owner's ``local`` ones.

        Stats (and each factor's dtype and rank k) travel with one ``all_gather_object``; the factors
        ``U_k (m, k), σ_k (k,), V_k (n, k)`` with :func:`broadcast_from_owners`.
        """
        if not is_distributed():
            return dict(local)
        meta = {n: (r.stats, None) if r.factors is None
                else (r.stats, (str(r.factors.U.dtype).removeprefix("torch."), int(r.factors.S.shape[0])))
                for n, r in local.items()}
        everyone: list[dict] = [{} for _ in range(self.world)]
        dist.all_gather_object(everyone, meta)
        merged = {k: v for part in everyone for k, v in part.items()}
        payloads, owners, out = [], [], {}
        for name, owner, (m, n) in zip(self.names, self.owners, self.shapes):
            stats, layout = merged[name]
            if layout is None:
                out[name] = LayerRefresh(name, None, stats)
                continue
            if owner == self.rank:
                f = local[name].factors
            else:
                dt, k = getattr(torch, layout[0]), layout[1]
                f = Spectrum(U=torch.empty(m, k, dtype=dt), S=torch.empty(k, dtype=dt), V=torch.empty(n, k, dtype=dt))
            payloads.append([f.U, f.S, f.V])
            owners.append(owner)
            out[name] = LayerRefresh(name, f, stats)
        broadcast_from_owners(payloads, owners)
        return out


def add_low_rank_(target: torch.Tensor, left: torch.Tensor, v: torch.Tensor, alpha: float = 1.0) -> None:
    """``target += alpha · left @ v.T`` in place; for an FSDP2 shard only its own rows are formed.

    target: (m, n) tensor or DTensor (``Shard(0)``); left: (m, k); v: (n, k).
    """
    rows = local_rows(target)
    if rows is None:
        target.addmm_(left.to(target.dtype), v.to(target.dtype).T, alpha=alpha)
        return
    local = target.to_local()
    local.addmm_(left[rows[0] : rows[1]].to(local.device, local.dtype), v.to(local.device, local.dtype).T,
                 alpha=alpha)


def low_rank_projections(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """s_r = u_rᵀ W v_r for each of the k columns: (k,) in float32 or wider, no gradient.

    weight: (m, n) tensor or DTensor (``Shard(0)``: each rank sums its rows, then the group sums);
    u: (m, k); v: (n, k).
    """
    rows = local_rows(weight)
    local = weight if rows is None else weight.to_local()
    u = u if rows is None else u[rows[0] : rows[1]]
    dtype = torch.promote_types(local.dtype, torch.float32)
    s = (u.to(local.device, dtype) * (local.to(dtype) @ v.to(local.device, dtype))).sum(0)
    if rows is not None:
        dist.all_reduce(s, group=weight.device_mesh.get_group())
    return s


# --------------------------------------------------------------------------- FSDP2 weights
def _is_dtensor(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def _row_sharded(t: torch.Tensor) -> bool:
    return t.device_mesh.ndim == 1 and len(t.placements) == 1 and t.placements[0] == Shard(0)


def _chunk_bounds(rows: int, world: int, rank: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` that ``torch.chunk`` (FSDP2's sharding rule) gives ``rank``."""
    size = math.ceil(rows / world) if rows else 0
    start = min(rank * size, rows)
    return start, min(start + size, rows)


def local_rows(weight: torch.Tensor) -> tuple[int, int] | None:
    """Rows ``[start, stop)`` of the full weight stored on this rank; ``None`` for a plain tensor."""
    if not _is_dtensor(weight):
        return None
    if not _row_sharded(weight):
        raise ValueError(
            f"local_rows: only 1-D meshes with Shard(0) (FSDP2 default) are supported, got {weight.placements}"
        )
    group = weight.device_mesh.get_group()
    return _chunk_bounds(weight.shape[0], dist.get_world_size(group), dist.get_rank(group))


def gather_to_owner(weight: torch.Tensor, owner: int) -> torch.Tensor | None:
    """The full ``(m, n)`` weight on rank ``owner`` and ``None`` elsewhere.

    A plain tensor (single process, DDP) is already whole on every rank: it is returned as is, no
    communication. An FSDP2 ``DTensor`` sharded ``Shard(0)`` on a 1-D mesh is collected with one
    ``dist.gather`` to ``owner`` (a collective: every rank of the mesh must call it, in the same
    order; only the owner receives the ``m n`` elements). Other layouts (e.g. HSDP 2-D meshes) fall
    back to ``redistribute(Replicate)``, which materialises the weight on every rank; the owner
    keeps it and the others drop it.
    """
    if not _is_dtensor(weight):
        return weight.detach()
    if not _row_sharded(weight):
        full = weight.detach().redistribute(placements=[Replicate()] * weight.device_mesh.ndim).to_local()
        return full if dist.get_rank() == owner else None
    group = weight.device_mesh.get_group()
    world = dist.get_world_size(group)
    rows = weight.shape[0]
    chunk = math.ceil(rows / world) if rows else 0
    local = weight.detach().to_local()
    dev = _comm_device(local.device)
    padded = torch.zeros((chunk,) + tuple(weight.shape[1:]), dtype=local.dtype, device=dev)
    padded[: local.shape[0]] = local.to(dev)
    is_owner = dist.get_rank() == owner
    bucket = [torch.empty_like(padded) for _ in range(world)] if is_owner else None
    dist.gather(padded, gather_list=bucket, dst=owner, group=group)
    if not is_owner:
        return None
    parts = []
    for r, piece in enumerate(bucket):
        start, stop = _chunk_bounds(rows, world, r)
        parts.append(piece[: stop - start])
    return torch.cat(parts).to(local.device)
