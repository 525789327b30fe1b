"""Private training data parallel over torch.distributed: DDP and FSDP2 (fully_shard), gloo or NCCL.

Under torchrun every rank calls make_private on the same model (plain, wrapped in DistributedDataParallel
or sharded by fully_shard) and runs the one-process engine on its share of each logical batch. What the
process group changes:

- Sampling: the rows' draw stream is shared (one seed on every rank), so each rank draws the Poisson batch
  of the whole data that one process would draw, and keeps the rows i with i mod W == its rank (a fixed
  partition). With secure_rng each rank draws its own rows from the OS instead. Every rank takes the same
  logical steps and the same number of physical batches (padded with empty ones), so no collective ever
  waits for a rank that has nothing to do.
- Clipping stays local: each row lives on one rank, which computes its per-sample norm and clipped
  gradient whole. The clipped sums are then summed over the ranks, a clipping group at a time, launched
  asynchronously from the backward pass of the logical batch's last physical batch as soon as the group is
  clipped (in a fixed order of groups, the same on every rank). With group-wise clipping the reduction of
  the last layers overlaps with the backward of the first; all-layer clipping has one group, complete only
  when the backward ends, so it is reduced then.
- Noise exactly once per logical step, std sigma*C in total:
  replicated parameters (a plain model, DDP): the sums are all-reduced, then every rank adds the same
  Gaussian draw from the shared noise seed (the one-process engine's own draw: replicas stay bit-identical);
  with secure_rng rank 0 draws it and broadcasts the noised sum.
  FSDP2 (parameters sharded on dim 0 over a 1-D mesh): the sums are reduce-scattered and each rank adds
  independent noise, from a stream of its own, to its shard: every coordinate gets noise once.
- The average is over the expected global batch q n; the accountant sees the global q and the logical
  steps: epsilon is the one-process engine's.
- Gradient transforms (DiSK, DOPPLER, DiceSGD) run with replicated parameters: once the sums are reduced (and,
  for DiceSGD, the unclipped sums too), every rank runs the one-process release on them, so the transforms'
  state is the same on every rank. DiSK's second evaluation point defers clipping to step(), so its sums are
  reduced there rather than from the backward pass. Under FSDP2 they are refused (DiceSGD needs the norm of
  the whole error, DiSK the whole step), as are GeN's loss probes (their releases are not reduced yet).

DDP's own gradient reducer is switched off while the engine is attached: it would average gradients that
autograd does not compute for most layers; the engine's reduction of the clipped sums takes its place. The
engine's collectives run on a process group of their own, so their order never interleaves with FSDP's
all-gathers. Every reduction is a sum, and make_private checks that the backend's collectives do sum (a
reduce-scatter that averaged, as FSDP2's did on gloo in some torch versions, would scale every update by 1/W).

``spawn(fn, nproc, ...)`` runs a training in nproc fresh processes of one machine joined in a gloo group (what
``expunge train --dp --nproc N`` uses for tabular and language-model runs) and hands back rank 0's result.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import ExpungeError

# torch 2.13 renamed reduce_scatter_tensor (same arguments); older versions have only the first name
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _kind(model: nn.Module) -> str | None:
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel):
        return "ddp"
    if isinstance(model, FSDPModule):
        return "fsdp"
    return None


class DataParallel:
    """The engine's side of a process group: sampling share, reductions of the clipped sums, noise placement."""

    def __init__(self, model: nn.Module, wrapper: nn.Module, kind: str, group):
        self.model, self.wrapper, self.kind = model, wrapper, kind  # model: the module the engine hooks
        ranks = dist.get_process_group_ranks(group)
        self.rank, self.world, self.root = dist.get_rank(group), len(ranks), ranks[0]
        self.group = dist.new_group(ranks)  # the engine's own: its collectives never interleave with FSDP's
        self.device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" \
            else torch.device("cpu")
        self._order = []  # clipping groups in the order their sums are reduced (the same on every rank)
        self._params_of: dict[int, list] = {}
        self._ready: set[int] = set()
        self._next = 0
        self._pending: dict[int, tuple] = {}  # id(param) -> (work, reduced tensor: whole, or this rank's shard)

    # -- set-up --------------------------------------------------------------------------------------
    @staticmethod
    def detect(model: nn.Module, distributed: bool | None) -> DataParallel | None:
        """The data-parallel set-up for `model`, or None to train in one process. All ranks must call it."""
        if not dist.is_available():
            if distributed:
                raise ExpungeError("distributed=True but this torch has no torch.distributed")
            return None
        kind = _kind(model)
        initialised = dist.is_initialized()
        if distributed is False:
            if kind is not None:
                raise ExpungeError(f"the model is wrapped for data parallel training ({kind.upper()}) but "
                                   "distributed=False: pass the plain module, or distributed=True")
            return None
        if distributed is None and kind is None and not (initialised and dist.get_world_size() > 1):
            return None
        if not initialised:
            raise ExpungeError("distributed training needs an initialised process group: launch with torchrun "
                               "(or torch.multiprocessing) and call torch.distributed.init_process_group first")
        if kind == "ddp":
            return DataParallel(model.module, model, kind, model.process_group)
        if kind == "fsdp":
            from torch.distributed.tensor import DTensor, Shard

            meshes = []
            for name, p in model.named_parameters():
                if not p.requires_grad:
                    continue
                if not isinstance(p, DTensor) or tuple(p.placements) != (Shard(0),) or p.dim() == 0:
                    raise ExpungeError(f"parameter {name} is not sharded on dim 0 over a 1-D mesh: private FSDP2 "
                                       "needs fully_shard on the model root (and any submodules), without "
                                       "hybrid sharding")
                meshes.append(p.device_mesh)
            if not meshes or any(m != meshes[0] for m in meshes):
                raise ExpungeError("private FSDP2 needs every trainable parameter sharded over one device mesh")
            return DataParallel(model, model, kind, meshes[0].get_group())
        return DataParallel(model, model, "replicated", dist.group.WORLD)

    def shared_seed(self, seed: int | None, secure: bool) -> int | None:
        """One seed for every rank's row draws and (replicated models) noise; rank 0 picks it when none is
        given. Different seeds on different ranks are refused: one would have to win silently."""
        if secure:
            return seed
        seeds = [None] * self.world
        dist.all_gather_object(seeds, seed, group=self.group)
        if len(set(seeds)) > 1:
            raise ExpungeError(f"the ranks gave make_private different seeds {seeds}: give every rank the same "
                               "seed (the engine derives each rank's own streams from it)")
        if seed is None:
            box = [int.from_bytes(os.urandom(8), "little") >> 1]
            dist.broadcast_object_list(box, src=self.root, group=self.group)
            seed = box[0]
        return seed

    def bind(self, engine) -> None:
        """Called by the engine once its groups and noise exist (make_private has checked everything)."""
        if self.kind == "ddp":
            self.wrapper.require_backward_grad_sync = False  # DDP's reducer idles (as under no_sync): module doc
        if self.kind == "replicated":  # replicas start equal (as DDP's constructor makes them)
            with torch.no_grad():
                for t in [*self.model.parameters(), *self.model.buffers()]:
                    dist.broadcast(t.data, src=self.root, group=self.group)
        if self.kind == "fsdp":
            engine.noise = engine.noise.fork(self.rank)  # each shard's noise independent of the others'
        self._order = list(reversed(engine.groups))  # roughly the order the backward pass finishes them
        for group in engine.groups:
            self._params_of[id(group)] = list({id(h.params[n]): h.params[n] for h, n in group.members}.values())
        self._check_sums()

    def _check_sums(self) -> None:
        ones = torch.ones(self.world, device=self.device)
        if self.kind == "fsdp":
            out = torch.empty(1, device=self.device)
            _reduce_scatter(out, ones, group=self.group)
        else:
            out = ones[:1].clone()
            dist.all_reduce(out, group=self.group)
        if out.item() != self.world:
            raise ExpungeError(f"the {dist.get_backend(self.group)} backend reduced {self.world} ones to {out.item()}, "
                               f"not their sum: this torch version's collectives cannot carry the clipped sums")

    def detach(self) -> None:
        if self.kind == "ddp":
            self.wrapper.require_backward_grad_sync = True

    # -- sampling --------------------------------------------------------------------------------------
    def draw(self, engine) -> np.ndarray:
        """This rank's rows of the next logical batch (each row of the data drawn with probability q)."""
        if engine.secure_rng:
            mine = np.arange(self.rank, engine.n, self.world)
            rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
            return mine[rng.random(len(mine)) < engine.sample_rate]
        rows = np.flatnonzero(engine._rows_rng.random(engine.n) < engine.sample_rate)
        return rows[rows % self.world == self.rank]

    def most(self, count: int) -> int:
        """The largest `count` over the ranks."""
        t = torch.tensor([count], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    # -- reduction and noise ---------------------------------------------------------------------------
    def ready(self, engine, group) -> None:
        """A group's clipped sum of the logical batch is complete: reduce it, and any it was holding back."""
        self._ready.add(id(group))
        while self._next < len(self._order) and id(self._order[self._next]) in self._ready:
            self._launch(engine, self._order[self._next])
            self._next += 1

    def _launch(self, engine, group) -> None:
        for p in self._params_of[id(group)]:
            s = engine.summed.get(id(p))
            if s is None:  # nothing drawn on this rank (or the layer unused): it still takes part
                s = engine.summed[id(p)] = torch.zeros(p.shape, dtype=_wide(p.dtype), device=p.device)
            elif not s.is_contiguous():  # a transposed view (Conv1D's sum): the collectives need dense memory
                s = engine.summed[id(p)] = s.contiguous()
            if self.kind == "fsdp":  # FSDP2's layout: torch.chunk of dim 0, each chunk padded to the first's size
                chunk = -(-p.shape[0] // self.world)
                padded = s if chunk * self.world == s.shape[0] else torch.cat(
                    [s, s.new_zeros(chunk * self.world - s.shape[0], *s.shape[1:])])
                out = s.new_empty(chunk, *s.shape[1:])
                work = _reduce_scatter(out, padded, group=self.group, async_op=True)
                rows = p.to_local().shape[0]
                self._pending[id(p)] = (work, out[:rows])
            else:
                self._pending[id(p)] = (dist.all_reduce(s, group=self.group, async_op=True), s)

    def release(self, engine) -> list[torch.Tensor]:
        """The noised average gradient of the logical batch, one per engine.params, in each parameter's layout."""
        for group in self._order[self._next:]:
            self._launch(engine, group)
        std, mean = engine.noise_std, engine.expected_batch_size
        if engine.transforms:
            return self._release_transformed(engine, std, mean)
        grads = []
        for p in engine.params:
            work, g = self._pending.pop(id(p))
            work.wait()
            if std > 0:
                if self.kind != "fsdp" and engine.secure_rng:  # no shared seed: rank 0 draws, all take its sum
                    if self.rank == 0:
                        engine.noise.add_to(g, std)
                    dist.broadcast(g, src=self.root, group=self.group)
                else:
                    engine.noise.add_to(g, std)
            g.div_(mean)
            if self.kind == "fsdp":
                from torch.distributed.tensor import DTensor

                g = DTensor.from_local(g, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            grads.append(g)
        self._ready.clear()
        self._next = 0
        return grads

    def _release_transformed(self, engine, std: float, mean: float) -> list[torch.Tensor]:
        """Replicated parameters (DDP, a plain model) with gradient transforms: the one-process release on the
        sums reduced over the ranks. Every sum is complete first (DiceSGD's error feedback takes the norm of all
        of them), then the transforms before noise, the noise (the shared draw), the average and the transforms
        after noise run on every rank alike, so their state, like the replicas, stays the same everywhere."""
        summed = []
        for p in engine.params:
            work, s = self._pending.pop(id(p))
            work.wait()
            summed.append(s)
        unclipped = None
        if engine.need_unclipped:  # sum_i g_i over the logical batch, as the one-process engine holds it
            unclipped = []
            for p in engine.params:
                u = engine.unclipped.get(id(p))
                if u is None:
                    u = torch.zeros(p.shape, dtype=_wide(p.dtype), device=p.device)
                u = u.contiguous()
                dist.all_reduce(u, group=self.group)
                unclipped.append(u)
        for t in engine.transforms:
            summed = t.before_noise(engine, summed, unclipped)
        if std > 0:
            for s in summed:
                if engine.secure_rng:  # no shared seed: rank 0 draws, all take its sum
                    if self.rank == 0:
                        engine.noise.add_to(s, std)
                    dist.broadcast(s, src=self.root, group=self.group)
                else:
                    engine.noise.add_to(s, std)
        grads = [s.div_(mean) for s in summed]
        for t in engine.transforms:
            grads = t.after_noise(engine, grads)
        self._ready.clear()
        self._next = 0
        return grads

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self, engine) -> dict:
        """What a resumed run needs beyond the one-process state: under FSDP2 every rank's noise stream
        (gathered, so that rank 0 can save one file). A collective: every rank calls it."""
        state = {"kind": self.kind, "world": self.world}
        if self.kind == "fsdp":
            streams = [None] * self.world
            dist.all_gather_object(streams, engine.noise.state_dict(), group=self.group)
            state["noise_ranks"] = streams
        return state

    def load_state_dict(self, engine, state: dict) -> None:
        if (state["kind"] == "fsdp") != (self.kind == "fsdp"):
            raise ExpungeError(f"the saved engine trained {state['kind']}, this one {self.kind}: resume the same way")
        if self.kind == "fsdp":
            if state["world"] != self.world:
                raise ExpungeError(f"the saved FSDP2 engine had {state['world']} ranks (one noise stream each), "
                                   f"this one {self.world}: resume on {state['world']} ranks")
            mine = state["noise_ranks"][self.rank]
            engine.noise.load_state_dict(mine["cpu"], mine["devices"])


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


# -- checkpoints -----------------------------------------------------------------------------------------
def save_checkpoint(directory, model: nn.Module, optimizer, engine) -> None:
    """Save the (sharded) model and optimizer with torch.distributed.checkpoint, and the engine's state
    (rank 0 writes it, atomically). Every rank calls it."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    directory = Path(directory)
    base = getattr(optimizer, "base", optimizer)
    model_state, optim_state = get_state_dict(model, base)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / "shards"))
    state = engine.state_dict()
    if dist.get_rank() == 0:
        partial = directory / "engine.pt.partial"
        torch.save(state, partial)
        os.replace(partial, directory / "engine.pt")
    dist.barrier()


def load_checkpoint(directory, model: nn.Module, optimizer, engine) -> None:
    """Restore what save_checkpoint wrote into a model, optimizer and engine set up as they were saved."""
    from pathlib import Path

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(directory)
    if not (directory / "engine.pt").exists():
        raise ExpungeError(f"no checkpoint in {directory} (engine.pt missing): give the folder save_checkpoint wrote")
    base = getattr(optimizer, "base", optimizer)
    model_state, optim_state = get_state_dict(model, base)
    dcp.load({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(directory / "shards"))
    set_state_dict(model, base, model_state_dict=model_state, optim_state_dict=optim_state)
    engine.load_state_dict(torch.load(directory / "engine.pt", weights_only=False))


# -- launching ---------------------------------------------------------------------------------------------
def spawn(fn, nproc: int, *args):
    """Run ``fn(rank, *args)`` in ``nproc`` fresh processes (torch.multiprocessing.spawn) joined in a gloo process
    group (a file rendezvous in a temporary folder) and return rank 0's result. ``fn`` must be a module-level
    function and its arguments picklable. When a rank fails, spawn ends the others (none waits on a collective
    forever); an ExpungeError raised by a rank is raised here as one, with its message. The processes start by
    importing the main module afresh (the spawn start method): a script that gets here keeps its top-level work
    under ``if __name__ == "__main__":``."""
    import tempfile

    import torch.multiprocessing as mp

    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ExpungeError(f"--nproc must be a positive number of processes, got {nproc!r}")
    with tempfile.TemporaryDirectory() as folder:
        try:
            mp.spawn(_spawned, args=(fn, nproc, folder, args), nprocs=nproc, join=True)
        except mp.ProcessRaisedException:
            refused = sorted(Path(folder).glob("refused-*.txt"))
            if refused:
                raise ExpungeError(refused[0].read_text()) from None
            raise
        return torch.load(Path(folder) / "result.pt", weights_only=False)


def _spawned(rank: int, fn, nproc: int, folder: str, args: tuple) -> None:
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=nproc)
    try:
        result = fn(rank, *args)
        if rank == 0:
            partial = Path(folder) / "result.pt.partial"
            torch.save(result, partial)
            os.replace(partial, Path(folder) / "result.pt")
    except ExpungeError as e:
        (Path(folder) / f"refused-{rank}.txt").write_text(str(e))
        raise
    finally:
        dist.destroy_process_group()
