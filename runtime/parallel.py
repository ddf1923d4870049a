"""One video over several processes: `torchrun --nproc_per_node N flf2v-run ... --ulysses_size U [--cfg_parallel]
[--dit_fsdp] [--t5_fsdp]`, on torch.distributed (NCCL on GPUs, gloo on CPUs).

Ranks are laid out CFG-major: rank = c * U + u, c = 0 the cond branch and 1 the uncond one (with
--cfg_parallel), u the rank's place in its Ulysses group. N must equal U x (2 with --cfg_parallel, else 1).
- CFG-parallel: each branch's ranks run the DiT on their own context row (batch 1); one all-gather per step
  over the pair {u, U + u} gives every rank both velocities, and each rank applies the same guidance and
  sampler update, so all ranks hold the same latent (runtime/denoise.py `CfgSplit`).
- Ulysses: the DiT's tokens split across the U ranks of a group (models/parallel.py).
- --dit_fsdp / --t5_fsdp: the network's weights sharded over all N ranks with FSDP2 (`fully_shard` per block);
  each rank reads only its rows of every tensor from the official files (models/sharded.py).
Every rank computes the encoders and the loop; rank 0 decodes, writes the mp4 and the metrics; every rank
reports its own memory. A rank that dies makes the others' next collective fail (gloo: connection reset) and
torchrun stop them (SIGTERM): one line each, exit 1; a rank that hangs makes the others' collectives fail after
--dist_timeout seconds. Under NCCL a timed-out collective is ended by torch's NCCL watchdog, which aborts the
process (no line of ours), and collectives replayed inside a captured CUDA graph are not watched at all: on
GPUs, `--cuda_graph false` keeps the timeout in force (UNVERIFIED: no GPU here).
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from flf2v.models.parallel import SequenceParallel

from .media import InputError


def world_from_env() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) in a plain process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def check_layout(world: int, ulysses_size: int, cfg_parallel: bool, ring_size: int = 1) -> None:
    """InputError unless the flags describe `world` processes (before any process group exists)."""
    if ring_size != 1:
        raise InputError(f"--ring_size {ring_size}: ring attention is not implemented; use --ulysses_size for "
                         f"sequence parallelism (--ring_size 1)")
    if ulysses_size < 1:
        raise InputError(f"--ulysses_size {ulysses_size} must be at least 1")
    want = ulysses_size * (2 if cfg_parallel else 1)
    if want != world:
        how = f"--ulysses_size {ulysses_size}" + (" x 2 (--cfg_parallel)" if cfg_parallel else "")
        raise InputError(f"{how} needs {want} processes, but this run has {world}; launch with "
                         f"`torchrun --nproc_per_node {want} ...` or change --ulysses_size/--cfg_parallel")


@dataclass
class CfgSplit:
    """This rank's CFG branch (0 cond, 1 uncond) and the pair it gathers velocities with."""
    index: int
    group: object

    def gather(self, pair: torch.Tensor, v: torch.Tensor) -> None:
        """pair [2, ...] <- (cond, uncond) velocities, v [1, ...] this rank's."""
        # torch 2.13 renamed all_gather_into_tensor (which now warns on every call) to all_gather_single
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        gather(pair, v.contiguous(), group=self.group)


@dataclass
class Parallel:
    rank: int
    world: int
    ulysses_size: int
    cfg_parallel: bool
    device: torch.device
    sp: SequenceParallel | None = None
    cfg: CfgSplit | None = None
    mesh: object = None  # the 1-D device mesh over all ranks (FSDP)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def agree(self, run: dict, seed: int) -> int:
        """Rank 0's seed, once every rank holds the same `run` (settings and frames, seed left out): a random
        seed (-1) is drawn by each process, and ranks that differ in a setting or a frame (a flag or file given
        differently to one node) would run collectives of other shapes, or another video, without a word.
        InputError on every rank, naming the first setting that differs, before any collective of the run.
        Ran over gloo only (UNVERIFIED under NCCL: all_gather_object there goes through the rank's GPU)."""
        runs = [None] * self.world
        dist.all_gather_object(runs, (run, seed))
        first = runs[0][0]
        for r, (other, _) in enumerate(runs):  # every rank finds the same difference, and rank 0 says it
            if other != first:
                key = next(k for k in sorted(first.keys() | other.keys()) if first.get(k) != other.get(k))
                raise InputError(f"the processes of this torchrun job disagree on {key} (rank 0: "
                                 f"{first.get(key)!r}, rank {r}: {other.get(key)!r}); give every process the "
                                 f"same flags and files")
        return runs[0][1]


def init(ulysses_size: int = 1, cfg_parallel: bool = False, device: torch.device | None = None,
         timeout_s: float = 600.0, ring_size: int = 1) -> Parallel | None:
    """The process group of this torchrun job and this rank's groups; None in a single process without
    parallel flags. InputError (before any collective) when the flags do not match the processes."""
    _, world, local = world_from_env()
    check_layout(world, ulysses_size, cfg_parallel, ring_size)
    if world == 1:
        return None
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        # torch._dynamo (which loading the DiT imports) keeps the default group alive past destroy_process_group
        # if first imported after it exists (measured: its gloo worker threads then live until interpreter
        # exit, see shutdown)
        from torch import _dynamo  # noqa: F401
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return groups(ulysses_size, cfg_parallel, device, timeout_s)


def groups(ulysses_size: int, cfg_parallel: bool, device: torch.device, timeout_s: float = 600.0) -> Parallel:
    """This rank's Ulysses and CFG groups in the initialised world (every rank creates every group, in one
    order, as torch.distributed requires); their collectives give up after `timeout_s`."""
    from torch.distributed.device_mesh import init_device_mesh
    rank, world = dist.get_rank(), dist.get_world_size()
    timeout = timedelta(seconds=timeout_s)  # new groups do not inherit the world's
    check_layout(world, ulysses_size, cfg_parallel)
    u = ulysses_size
    par = Parallel(rank, world, u, cfg_parallel, device)
    for c in range(2 if cfg_parallel else 1):  # Ulysses groups: one per CFG branch
        ranks = list(range(c * u, (c + 1) * u))
        g = dist.new_group(ranks, timeout=timeout) if u > 1 else None
        if rank in ranks and g is not None:
            par.sp = SequenceParallel(g, u, rank - c * u)
    if cfg_parallel:
        for i in range(u):  # CFG pairs: the same Ulysses place in both branches
            g = dist.new_group([i, u + i], timeout=timeout)
            if rank % u == i:
                par.cfg = CfgSplit(rank // u, g)
    par.mesh = init_device_mesh(device.type, (world,))
    return par


def shutdown(par: Parallel | None = None) -> None:
    """Destroy the process groups and join their worker threads now. A gloo worker still alive at interpreter
    exit that frees the tensors of a collective just finished needs the GIL there and aborts the process
    ("terminate called without an active exception", SIGABRT; 1 or 2 in 40 runs on a loaded 2-core machine, after
    the video was written). The groups die with their last reference: `par`'s are dropped here."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if par is not None:
        if par.sp is not None:
            par.sp.group = None
        if par.cfg is not None:
            par.cfg.group = None
        if par.mesh is not None:  # torch 2.13's mesh holds its groups, and FSDP's DTensors (cached by torch) it
            getattr(par.mesh, "_pg_registry", {}).clear()
        par.mesh = None
    gc.collect()  # a group held in a reference cycle
