"""make_private: DP-SGD / DP-Adam (any torch.optim optimizer) with per-sample clipping in one backward pass.

    engine = make_private(model, optimizer, (X, y), target_epsilon=3, target_delta=1e-5, epochs=10,
                          max_grad_norm=1.0, batch_size=256)
    for epoch in range(10):
        for x, y in engine.loader:                 # Poisson-sampled; physical batches of a logical one
            engine.optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            engine.optimizer.step()                # noise + base step only at the end of a logical batch
    engine.epsilon()                               # PLD; engine.epsilon(accountant="rdp") cross-checks

Each logical step releases  (sum_i clip(g_i) + N(0, sigma^2 C^2 I)) / (q n) : the clipped sum of the rows
that Poisson sampling drew, Gaussian noise once per logical step, averaged by the expected batch size q n
(so an empty batch is a pure-noise step, as the accounting assumes). Clipping is over groups of parameters
with thresholds C_k = C / sqrt(K) (total sensitivity C); a group is clipped, and its buffers freed, as soon
as the backward pass has finished with it.
"""
from __future__ import annotations

import hashlib
import math
import os
import warnings
import weakref
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..errors import ExpungeError
from .accounting import ACCOUNTANTS, Phase, calibrate_noise, check_delta
from .accounting import epsilon as compose_epsilon
from .distributed import DataParallel
from .persample import LayerHandler, build_handlers
from .shared import LOW_PRECISION, inner

CLIP_FNS = ("abadi", "automatic", "global")
CLIPPING_STYLES = ("all-layer", "layer-wise", "param-wise")


def check_private_settings(epsilon, noise_multiplier, delta, clip_fn: str, clipping: str) -> None:
    """The settings every private run checks before anything is written (tabular and language-model runs)."""
    if (epsilon is None) == (noise_multiplier is None):
        raise ExpungeError("private training needs a target --epsilon or a fixed --noise-multiplier (one of them)")
    if epsilon is not None and not epsilon > 0:
        raise ExpungeError(f"--epsilon must be positive, got {epsilon}")
    check_delta(delta)
    if clip_fn not in CLIP_FNS:
        raise ExpungeError(f"unknown --clip-fn {clip_fn!r}; use one of {', '.join(CLIP_FNS)}")
    if clipping not in CLIPPING_STYLES:
        raise ExpungeError(f"unknown --clipping {clipping!r}; use one of {', '.join(CLIPPING_STYLES)}")


def clip_factors(norms: torch.Tensor, threshold: float, clip_fn: str, gamma: float = 0.01) -> torch.Tensor:
    """Per-row factors c_i with ||c_i g_i|| <= threshold.

    abadi: min(1, C/||g||) (Abadi et al. 2016); automatic: C/(||g|| + gamma) (AUTO-S, Bu et al. 2023, a
    normalisation whose lr absorbs C); global: 1 when ||g|| <= C else 0 (Bu et al. 2021, global clipping:
    rows inside the ball pass unchanged, the rest are dropped)."""
    if clip_fn == "abadi":
        return (threshold / norms.clamp_min(1e-12)).clamp(max=1.0)
    if clip_fn == "automatic":
        return threshold / (norms + gamma)
    if clip_fn == "global":
        return (norms <= threshold).to(norms.dtype)
    raise ExpungeError(f"unknown clip_fn {clip_fn!r}; use one of {', '.join(CLIP_FNS)}")


@dataclass
class ClipGroup:
    members: list[tuple[LayerHandler, str]]  # (handler, parameter attribute): every use of every parameter
    threshold: float
    done: bool = False
    tied: list[list[tuple[LayerHandler, str]]] = field(default_factory=list)  # the uses of each shared parameter

    @property
    def handlers(self) -> list[LayerHandler]:  # asked on every capture: computed once
        seen = self.__dict__.get("_handlers")
        if seen is None:
            seen = self.__dict__["_handlers"] = list(dict.fromkeys(h for h, _ in self.members))
        return seen


def make_groups(handlers: list[LayerHandler], clipping, max_grad_norm: float) -> list[ClipGroup]:
    """Split the parameters (in order of first use) into clipping groups; thresholds C/sqrt(K). A parameter
    held by several layers (tied embeddings) is one parameter: it belongs to one group, under any of its
    names, and layer-wise clipping puts it with the first layer that uses it."""
    params: dict[int, tuple[list[str], list[tuple[LayerHandler, str]], LayerHandler]] = {}
    for h in handlers:
        for pname, p in h.params.items():
            names, uses, _ = params.setdefault(id(p), ([], [], h))
            names.append(f"{h.name}.{pname}" if h.name else pname)
            uses.append((h, pname))
    flat = list(params.values())  # (names, uses, first handler)

    def under(m, head: str) -> bool:
        return any(n == head or n.startswith(head + ".") for n in m[0])

    if clipping == "all-layer":
        parts = [flat]
    elif clipping == "layer-wise":
        parts = [part for part in ([m for m in flat if m[2] is h] for h in handlers) if part]
    elif clipping == "param-wise":
        parts = [[m] for m in flat]
    elif isinstance(clipping, (list, tuple)) and clipping and all(isinstance(c, str) for c in clipping):
        heads = list(clipping)
        unknown = [hd for hd in heads if not any(under(m, hd) for m in flat)]
        if unknown:
            names = ", ".join(m[0][0] for m in flat[:8])
            raise ExpungeError(f"clipping group heads {unknown} name no trainable parameter; heads are parameter or "
                               f"module names such as {names}")
        parts = []
        for m in flat:
            starts = any(under(m, hd) for hd in heads)
            first_of_head = starts and (not parts or not any(under(parts[-1][-1], hd) for hd in heads if under(m, hd)))
            if not parts or first_of_head:
                parts.append([])
            parts[-1].append(m)
    else:
        raise ExpungeError(f"clipping must be one of {', '.join(CLIPPING_STYLES)} or a list of group head names, "
                           f"got {clipping!r}")
    k = len(parts)
    return [ClipGroup([use for m in part for use in m[1]], max_grad_norm / math.sqrt(k),
                      tied=[m[1] for m in part if len(m[1]) > 1]) for part in parts]


def batch_rows(args, kwargs) -> int:
    """Rows of a model call: the first dimension of its first positional tensor, else of input_ids or
    inputs_embeds, else the largest first dimension among its tensor keywords (0 when there is none)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.shape[0]
    for key in ("input_ids", "inputs_embeds"):
        a = kwargs.get(key)
        if isinstance(a, torch.Tensor) and a.dim() > 0:
            return a.shape[0]
    return max((a.shape[0] for a in kwargs.values() if isinstance(a, torch.Tensor) and a.dim() > 0), default=0)


class NoiseSource:
    """Standard normal draws: a seeded torch generator (reproducible), or the OS CSPRNG (secure_rng). Noise
    for parameters on an accelerator is drawn there, by a generator of that device with the same seed."""

    def __init__(self, seed: int | None, secure: bool):
        self.secure = secure
        self.seed = seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self.device_generators: dict[str, torch.Generator] = {}

    def generator_for(self, device: torch.device) -> torch.Generator:
        if device.type == "cpu":
            return self.generator
        key = str(device)
        if key not in self.device_generators:
            self.device_generators[key] = torch.Generator(device).manual_seed(self.seed)
        return self.device_generators[key]

    def fork(self, stream: int) -> NoiseSource:
        """An independent source for `stream` (a rank's own noise), reproducible from this one's seed."""
        seed = int(np.random.SeedSequence([self.seed, stream]).generate_state(1, np.uint64)[0] >> np.uint64(1))
        return NoiseSource(seed, self.secure)

    def state_dict(self) -> dict:
        return {"cpu": self.generator.get_state(),
                "devices": {k: g.get_state() for k, g in self.device_generators.items()}}

    def load_state_dict(self, cpu_state, devices: dict) -> None:
        self.generator.set_state(cpu_state)
        for key, state in devices.items():
            self.generator_for(torch.device(key)).set_state(state)

    BLOCK = 1 << 20  # numbers drawn at a time by add_to

    def add_to(self, t: torch.Tensor, std: float) -> torch.Tensor:
        """t += std * N(0, I), in place, drawn a block at a time (t may be as large as an embedding table)."""
        t = t.contiguous()
        flat = t.view(-1)
        buffer = None if self.secure else torch.empty(min(self.BLOCK, flat.numel()), dtype=t.dtype, device=t.device)
        for start in range(0, flat.numel(), self.BLOCK):
            part = flat[start:start + self.BLOCK]
            if buffer is None:
                draw = self.normal(part.shape, part.dtype, part.device)
            else:  # the same numbers as randn, in one reused buffer (no fresh pages per block)
                draw = buffer[:part.numel()].normal_(generator=self.generator_for(t.device))
            part.add_(draw, alpha=std)
        return t

    def normal(self, shape, dtype, device=None) -> torch.Tensor:
        device = torch.device(device if device is not None else "cpu")
        if not self.secure:
            return torch.randn(shape, generator=self.generator_for(device), dtype=dtype, device=device)
        n = int(np.prod(shape)) if len(shape) else 1
        # Box-Muller on 53-bit uniforms from os.urandom: no seedable state for an attacker to recover.
        bits = np.frombuffer(os.urandom(16 * ((n + 1) // 2)), dtype=np.uint64).reshape(2, -1)
        u1 = ((bits[0] >> np.uint64(11)).astype(np.float64) + 1.0) / 2.0**53
        u2 = (bits[1] >> np.uint64(11)).astype(np.float64) / 2.0**53
        r = np.sqrt(-2.0 * np.log(u1))
        z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
        return torch.from_numpy(z).to(dtype).reshape(shape).to(device)


class PoissonLoader:
    """Each logical batch includes every row independently with probability q; it is yielded as physical
    batches of at most `physical_batch_size` rows (one empty batch when the draw is empty)."""

    def __init__(self, engine: PrivacyEngine, data, n: int, steps_per_epoch: int, physical_batch_size: int):
        self.engine, self.data, self.n = engine, data, n
        self.steps_per_epoch, self.physical_batch_size = steps_per_epoch, physical_batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch

    def logical_batches(self):
        for _ in range(self.steps_per_epoch):
            yield self.engine._draw_batch(self.n)

    def __iter__(self):
        for rows in self.logical_batches():
            chunks = [rows[i:i + self.physical_batch_size] for i in range(0, len(rows), self.physical_batch_size)]
            chunks = chunks or [rows]
            if self.engine.dist is not None:  # every rank takes as many forwards (their collectives pair up)
                chunks += [rows[:0]] * (self.engine.dist.most(len(chunks)) - len(chunks))
            for k, chunk in enumerate(chunks):
                self.engine.optimizer._logical_end = k == len(chunks) - 1
                self.engine._loader_rows = len(chunk)
                yield fetch(self.data, chunk)


def fetch(data, rows: np.ndarray):
    index = torch.as_tensor(rows, dtype=torch.long)
    if isinstance(data, (tuple, list)):
        return tuple(t[index] for t in data)
    if isinstance(data, torch.utils.data.TensorDataset):
        return tuple(t[index] for t in data.tensors)
    from torch.utils.data import default_collate
    if len(rows) == 0:  # shape of an empty batch taken from row 0
        return _take_none(default_collate([data[0]]))
    return default_collate([data[int(i)] for i in rows])


def _take_none(batch):
    if isinstance(batch, torch.Tensor):
        return batch[:0]
    if isinstance(batch, (tuple, list)):
        return type(batch)(_take_none(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _take_none(v) for k, v in batch.items()}
    return batch


def data_length(data) -> int:
    if isinstance(data, (tuple, list)):
        if not data or not all(isinstance(t, torch.Tensor) for t in data):
            raise ExpungeError("data must be a tuple of tensors (X, y), a TensorDataset or a map-style Dataset")
        lengths = {len(t) for t in data}
        if len(lengths) != 1:
            raise ExpungeError(f"the tensors in data have different lengths {sorted(lengths)}; they must share rows")
        return lengths.pop()
    if hasattr(data, "__len__") and hasattr(data, "__getitem__"):
        return len(data)
    raise ExpungeError("data must be a tuple of tensors (X, y), a TensorDataset or a map-style Dataset with __len__; "
                       "an iterable DataLoader cannot be Poisson-sampled")


class DPOptimizer(torch.optim.Optimizer):
    """Wraps any torch.optim optimizer: step() finishes the clipped sum of the physical batch and, at the end
    of a logical batch, adds the noise, averages by the expected batch size and lets the base optimizer step."""

    def __init__(self, base: torch.optim.Optimizer, engine: PrivacyEngine):
        # Share the base optimizer's groups and state rather than copying (as LR schedulers expect).
        self.base, self.engine = base, engine
        base._expunge_private_wrapper = weakref.ref(self)  # lets wrappers (GeN) refuse the bare base optimizer
        self.defaults = base.defaults
        self.param_groups = base.param_groups
        self.state = base.state
        self._logical_end = True
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def step(self, closure=None):
        """Without a closure, use the gradients of the backward pass just done. With one (a function that
        zeroes the gradients, computes the loss on the current physical batch, calls backward and returns
        the loss), the engine evaluates it where its transforms ask (DiSK: at two points)."""
        loss = self.engine._evaluate(closure) if closure is not None else None
        if closure is None and any(t.needs_closure for t in self.engine.transforms):
            raise ExpungeError("DiSK evaluates the loss at two points: pass a closure, optimizer.step(closure), "
                               "that zeroes grads, computes the loss on the batch, calls backward and returns it")
        # Clipping left for step() (layers whose backward did not finish it, DiSK's two points) and the release
        # run outside autograd: in grad mode they would chain a graph onto the captured activations.
        with torch.no_grad():
            self.engine._finish_physical_batch()
            if not self._logical_end:
                return loss
            self.engine._release_gradient()
        self._logical_end = True
        self.base.step()
        with torch.no_grad():
            for t in self.engine.transforms:
                t.after_step(self.engine)
        return loss

    def state_dict(self):
        return self.base.state_dict()

    def load_state_dict(self, state_dict) -> None:
        self.base.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return f"DPOptimizer({self.base!r})"


class PrivacyEngine:
    """Holds the clipping handlers, the noise, the sampler and the privacy history of one private training."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, data, *, n: int, sample_rate: float,
                 noise_multiplier: float, max_grad_norm: float, clipping, clip_fn: str, gamma: float,
                 physical_batch_size: int, steps_per_epoch: int, loss_reduction: str, seed: int | None,
                 secure_rng: bool, target_delta: float | None, accountant: str, planned_steps: int | None,
                 transforms=None, distributed: DataParallel | None = None):
        self.model, self.n = model, n
        self.sample_rate, self.noise_multiplier, self.max_grad_norm = sample_rate, noise_multiplier, max_grad_norm
        self.clip_fn, self.gamma, self.loss_reduction = clip_fn, gamma, loss_reduction
        self.target_delta, self.default_accountant, self.planned_steps = target_delta, accountant, planned_steps
        self.handlers = build_handlers(model)
        if not self.handlers:
            raise ExpungeError("the model has no trainable parameters")
        self.groups = make_groups(self.handlers, clipping, max_grad_norm)
        self.clipping = clipping
        self._groups_of = {h: [g for g in self.groups if h in g.handlers] for h in self.handlers}
        # each trainable parameter once, in order of first use (a tied parameter has several users)
        self.params = list({id(p): p for h in self.handlers for p in h.params.values()}.values())
        self.noise = NoiseSource(seed, secure_rng)
        # rows are drawn from a stream of their own (seed + 1), so noise and sampling never share draws
        self._rows_rng = np.random.default_rng(None if secure_rng or seed is None else seed + 1)
        self.secure_rng = secure_rng
        self.dist = distributed  # data parallel over a process group (DDP, FSDP2), or None
        if distributed is not None:
            distributed.bind(self)
        self.optimizer = DPOptimizer(optimizer, self)
        self.loader = PoissonLoader(self, data, n, steps_per_epoch, physical_batch_size)
        self.phases: list[Phase] = []
        self.releases: list[Phase] = []  # other accounted releases on private rows (GeN's loss probes)
        self._public_rows: set | None = None  # hashes of the private rows' features, for check_public
        self.steps = 0  # logical steps in the current phase
        self.phase_name = ""
        self._loader_rows: int | None = None  # rows of the physical batch the loader last yielded
        self.transforms = list(transforms or [])
        self.need_unclipped = any(t.needs_unclipped for t in self.transforms)
        for h in self.handlers:
            h.free_after_sum = not self.need_unclipped
        self.unclipped: dict[int, torch.Tensor] = {}  # id(param) -> sum_i g_i (only for transforms that need it)
        self._defer = False  # while a closure runs at several points, clip only once all are in
        self._set_noise_variance()
        self.summed: dict[int, torch.Tensor] = {}  # id(param) -> clipped sum over this logical batch
        for h in self.handlers:
            h.on_capture = self._on_capture
            h.attach()
        # the layers learn how many rows each forward of the model has (an input of one row is broadcast over
        # them), and forget it when the forward ends (a layer called on its own is left as it is)
        self._rows_hooks = (model.register_forward_pre_hook(self._note_rows, with_kwargs=True),
                            model.register_forward_hook(self._forget_rows, always_call=True))

    def _note_rows(self, module, args, kwargs) -> None:
        self._set_rows(batch_rows(args, kwargs))

    def _forget_rows(self, module, args, output) -> None:
        self._set_rows(0)

    def _set_rows(self, rows: int) -> None:
        for h in self.handlers:
            h.batch_rows = rows

    # -- sampling ------------------------------------------------------------------------------------
    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * self.n

    def _draw_batch(self, n: int) -> np.ndarray:
        if self.dist is not None:
            return self.dist.draw(self)
        if self.secure_rng:
            self._rows_rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
        return np.flatnonzero(self._rows_rng.random(n) < self.sample_rate)

    # -- clipping during backward ----------------------------------------------------------------
    def _scale(self, handler: LayerHandler) -> float:
        return float(handler.batch_size()) if self.loss_reduction == "mean" else 1.0

    def _on_capture(self, handler: LayerHandler) -> None:
        if self._defer or not handler.complete or handler.norms_sq is not None or handler.batch_size() == 0:
            return  # empty physical batches contribute nothing; step() clears them
        handler.scale = self._scale(handler)
        handler.compute_norms()
        for group in self._groups_of[handler]:
            if not group.done and all(h.norms_sq is not None for h in group.handlers):
                self._clip_group(group)
                if self.dist is not None and self.optimizer._logical_end:  # its sum is final: reduce it now
                    self.dist.ready(self, group)
                for h in group.handlers:  # only a group just clipped can finish a handler (was O(H) per capture)
                    if h.norms_sq is not None and all(g.done for g in self._groups_of[h]):
                        h.reset()

    def _clip_group(self, group: ClipGroup) -> None:
        total = None
        for h, pname in group.members:
            if h.norms_sq is not None:
                self._check_rows(h, len(h.norms_sq[pname]))
                total = h.norms_sq[pname] if total is None else total + h.norms_sq[pname]
        for uses in group.tied:  # a shared parameter: the cross terms between its uses
            live = [(h, pname) for h, pname in uses if h.norms_sq is not None]
            for j, (h1, p1) in enumerate(live):
                for h2, p2 in live[j + 1:]:
                    cross = inner(h1.per_sample(p1), h2.per_sample(p2))
                    total = total + cross.to(total.dtype) * (2 * h1.scale * h2.scale)
        group.done = True
        if total is None:
            return
        factors = clip_factors(total.sqrt(), group.threshold, self.clip_fn, self.gamma)
        for h in sorted(group.handlers, key=lambda h: h.sums_into_others):  # a tied head's dense sum first
            if h.norms_sq is None:
                continue
            names = [pname for hh, pname in group.members if hh is h]
            self._add_clipped(self.summed, h, {pname: factors for pname in names})
            if self.need_unclipped:
                ones = torch.ones_like(factors)
                self._add_clipped(self.unclipped, h, {pname: ones for pname in names})

    @staticmethod
    def _add_clipped(into: dict, handler: LayerHandler, factors: dict) -> None:
        """Add the handler's clipped sums to the running sums (id(param) -> tensor); a handler may add into a
        running sum in place (a tied weight's second use, a later physical batch): no new tensor then."""
        held = {pname: into.get(id(handler.params[pname])) for pname in factors}
        for pname, g in handler.clipped_sum(factors, held).items():
            key = id(handler.params[pname])
            if into.get(key) is None:
                into[key] = g  # clipped_sum returns fresh tensors (no graph): no copy
            elif into[key] is not g:
                into[key] += g

    def _check_rows(self, handler: LayerHandler, rows: int) -> None:
        """Every layer must see the batch's rows on dimension 0: a model that folds positions into the batch
        (x.reshape(B * T, d)) would clip tokens, not people."""
        expected = self._loader_rows
        if expected is None:
            expected = self._rows_seen = getattr(self, "_rows_seen", None) or rows
        if rows == 1 and expected > 1:
            raise ExpungeError(
                f"layer {handler.name or '<model>'} saw 1 row but the batch has {expected}: an input of one row "
                "that broadcasts over the batch is expanded to the batch's rows only in calls of the model given "
                "to make_private; call that model, not one of its parts")
        if rows != expected:
            raise ExpungeError(
                f"layer {handler.name or '<model>'} saw {rows} rows but the batch has {expected}: per-sample "
                "clipping needs each row on dimension 0 of every layer's input; do not fold other dimensions "
                "into the batch (keep x as (B, T, d), not (B*T, d))")

    def _finish_physical_batch(self) -> None:
        """Clip whatever the backward pass did not finish (layers whose output was unused, partial calls)."""
        for h in self.handlers:
            if h.norms_sq is None and not h.empty and h.batch_size() > 0:
                h.scale = self._scale(h)
                h.compute_norms()
        for group in self.groups:
            if not group.done:
                self._clip_group(group)
        self._rows_seen = None
        for h in self.handlers:
            h.reset()
        for group in self.groups:
            group.done = False

    def _release_gradient(self) -> None:
        """clip (done) -> transforms before noise -> noise -> average -> transforms after noise -> p.grad."""
        # sums, noise and transforms in float32 at least (a bfloat16 model gets its gradient rounded only at the end)
        def held(sums, p):
            return sums[id(p)] if id(p) in sums else torch.zeros(p.shape, dtype=_wide_dtype(p), device=p.device)

        if self.dist is not None:  # reduced over the ranks, noised once, averaged; in each parameter's layout
            for p, g in zip(self.params, self.dist.release(self)):
                p.grad = g.to(p.dtype)
            self.summed, self.unclipped = {}, {}
            self.steps += 1
            return
        summed = [held(self.summed, p) for p in self.params]
        unclipped = [held(self.unclipped, p) for p in self.params] if self.need_unclipped else None
        for t in self.transforms:
            summed = t.before_noise(self, summed, unclipped)
        std = self.noise_std
        if std > 0:  # noise added in place, a block at a time: no second parameter-sized tensor
            grads = [self.noise.add_to(s, std).div_(self.expected_batch_size) for s in summed]
        else:
            grads = [s / self.expected_batch_size for s in summed]
        for t in self.transforms:
            grads = t.after_noise(self, grads)
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        self.summed, self.unclipped = {}, {}
        self.steps += 1

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise added to the clipped sum (DiceSGD scales it up)."""
        scale = math.prod(t.noise_scale(self) for t in self.transforms)
        return self.noise_multiplier * self.max_grad_norm * scale

    def _set_noise_variance(self) -> None:
        """Optimizers that correct for the noise (DPAdamBC) learn its per-coordinate variance on the mean."""
        if hasattr(self.optimizer.base, "noise_variance"):
            self.optimizer.base.noise_variance = (self.noise_std / self.expected_batch_size) ** 2

    def _evaluate(self, closure):
        """Run the closure at each point the transforms ask for, weighting its per-sample gradients, so that
        the combination is clipped as one per-sample gradient (DiSK combines before clipping)."""
        points = [(None, 1.0)]
        for t in self.transforms:
            if t.needs_closure:
                points = t.points(self)
        points = [(shift, w) for shift, w in points if w != 0]
        loss = None
        self._defer = len(points) > 1
        try:
            for shift, weight in points:
                with torch.no_grad():
                    if shift is not None:
                        for p, s in zip(self.params, shift):
                            p.add_(s)
                try:
                    with self._scaled_output(weight):
                        value = closure()
                finally:
                    with torch.no_grad():
                        if shift is not None:
                            for p, s in zip(self.params, shift):
                                p.sub_(s)
                if shift is None or loss is None:
                    loss = value
        finally:
            self._defer = False
        return loss

    def _scaled_output(self, weight: float):
        """Scale every gradient flowing back from the model's output by `weight` during one closure call."""
        import contextlib

        if weight == 1.0:
            return contextlib.nullcontext()

        def hook(module, args, output):
            if not isinstance(output, torch.Tensor):
                raise ExpungeError("weighting gradients at several points needs a model that returns one tensor")
            if output.requires_grad:
                output.register_hook(lambda g: g * weight)

        handle = self.model.register_forward_hook(hook)

        @contextlib.contextmanager
        def scope():
            try:
                yield
            finally:
                handle.remove()

        return scope()

    def pretrain_public(self, public_data, *, epochs: float = 1, batch_size: int = 256, loss_fn=None,
                        batch_loss=None, seed: int | None = 0, name: str = "public") -> int:
        """Non-private training on public rows (DP continual pre-training's first phase) with the base
        optimizer; recorded as a public phase, which adds nothing to epsilon. Returns the steps taken.

        Each batch's loss is loss_fn(model(*inputs), target) for rows (inputs..., target) (cross-entropy by
        default), or batch_loss(model, batch) for rows of any other shape (a language model's ids, attention
        mask and labels, whose model returns an output object)."""
        import torch.nn.functional as F

        from .persample import _NoCapture

        if loss_fn is not None and batch_loss is not None:
            raise ExpungeError("give pretrain_public loss_fn or batch_loss, not both")
        if batch_loss is None and hasattr(self.model, "main_input_name"):  # a Hugging Face model: keyword inputs
            raise ExpungeError(
                f"pretrain_public: {type(self.model).__name__} takes keyword inputs and returns an output object; "
                "give batch_loss(model, batch) that computes the batch's loss (for a causal LM: "
                "causal_lm_loss(model(input_ids=..., attention_mask=...).logits, labels))")
        loss_fn = loss_fn or F.cross_entropy
        n = data_length(public_data)
        check_batch_size(batch_size, n)
        rng = np.random.default_rng(seed)
        steps = 0
        for _ in range(max(1, int(round(epochs)))):
            order = rng.permutation(n)
            for start in range(0, n, batch_size):
                batch = fetch(public_data, order[start:start + batch_size])
                self.optimizer.base.zero_grad()
                with _NoCapture():
                    if batch_loss is not None:
                        loss = batch_loss(self.model, batch)
                    else:
                        *inputs, target = batch
                        output = self.model(*inputs)
                        if not isinstance(output, torch.Tensor):
                            raise ExpungeError(
                                f"pretrain_public: the model returned a {type(output).__name__}, not a tensor; "
                                "give batch_loss(model, batch) that computes the batch's loss")
                        loss = loss_fn(output, target)
                    loss.backward()
                self.optimizer.base.step()
                steps += 1
        self.optimizer.base.zero_grad()
        self.add_public_phase(steps, name)
        return steps

    # -- accounting ------------------------------------------------------------------------------
    def history(self) -> list[Phase]:
        """Everything released on the private rows: gradient phases, then other releases (loss probes)."""
        return self.phases + ([self.current_phase()] if self.steps else []) + self.releases

    # -- releases besides the gradient steps (GeN's loss probes) ------------------------------------------
    def record_release(self, noise_multiplier: float, sample_rate: float, name: str) -> None:
        """Account one Poisson-sampled (rate `sample_rate`) Gaussian release on the private rows whose noise is
        `noise_multiplier` times its L2 sensitivity; consecutive alike releases share one Phase."""
        if not noise_multiplier > 0 or not 0 < sample_rate <= 1:
            raise ExpungeError(f"a release needs noise_multiplier > 0 and sample_rate in (0, 1], got "
                               f"{noise_multiplier}, {sample_rate}")
        last = self.releases[-1] if self.releases else None
        if last is not None and (last.noise_multiplier, last.sample_rate, last.name) == (noise_multiplier, sample_rate, name):
            self.releases[-1] = Phase(last.noise_multiplier, last.sample_rate, last.steps + 1, name=name)
        else:
            self.releases.append(Phase(float(noise_multiplier), float(sample_rate), 1, name=name))

    def check_public(self, batch) -> None:
        """Refuse a batch offered as public that holds a private row (the same features, exactly): reading it
        without noise would be an unaccounted release."""
        if self._public_rows is None:
            data = self.loader.data
            tensors = data if isinstance(data, (tuple, list)) else getattr(data, "tensors", None)
            first = tensors[0] if tensors is not None else torch.stack([torch.as_tensor(data[i][0]) for i in range(self.n)])
            self._public_rows = set(_row_hashes(first))
        features = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(features, torch.Tensor):
            raise ExpungeError("public probe batches must be tensors or tuples whose first item is the feature tensor, "
                               "so the engine can check that they hold no private row")
        clash = [i for i, h in enumerate(_row_hashes(features)) if h in self._public_rows]
        if clash:
            raise ExpungeError(f"{len(clash)} row(s) of a batch offered as public are private training rows (row "
                               f"{clash[0]} of the batch, for one): privatise the probe (PrivateLossProbe) or use data "
                               "that is not in the private set")

    def epsilon(self, delta: float | None = None, accountant: str | None = None) -> float:
        delta = delta if delta is not None else self.target_delta
        if delta is None:
            raise ExpungeError("no delta: pass engine.epsilon(delta) (make_private was given no target_delta)")
        return compose_epsilon(self.history(), delta, accountant or self.default_accountant)

    def start_phase(self, *, batch_size: int | None = None, noise_multiplier: float | None = None,
                    target_epsilon: float | None = None, steps: int | None = None, epochs: float | None = None,
                    name: str = "") -> float:
        """Close the current phase and continue with a new sampling rate and/or noise; with target_epsilon the
        noise is calibrated so that the whole history (earlier phases included) meets it. Returns the noise.
        Everything is checked and calibrated before the engine changes."""
        if target_epsilon is not None and noise_multiplier is not None:
            raise ExpungeError("give start_phase target_epsilon or noise_multiplier, not both")
        if target_epsilon is not None and self.target_delta is None:
            raise ExpungeError("start_phase(target_epsilon=...) needs a delta: give make_private a target_delta")
        if noise_multiplier is not None and noise_multiplier < 0:
            raise ExpungeError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if batch_size is not None:
            check_batch_size(batch_size, self.n)
        sample_rate = batch_size / self.n if batch_size is not None else self.sample_rate
        closed = self.phases + ([self.current_phase()] if self.steps else [])
        sigma, planned = self.noise_multiplier, self.planned_steps
        if target_epsilon is not None:
            planned = steps if steps is not None else _steps_for(epochs, sample_rate)
            sigma = calibrate_noise(sample_rate, planned, target_epsilon, self.target_delta, self.default_accountant,
                                    closed + self.releases)
        elif noise_multiplier is not None:
            sigma = float(noise_multiplier)
        self.phases, self.steps, self.phase_name = closed, 0, name
        self.sample_rate, self.noise_multiplier, self.planned_steps = sample_rate, sigma, planned
        self.loader.steps_per_epoch = _steps_per_epoch(sample_rate)
        self._set_noise_variance()
        return self.noise_multiplier

    def current_phase(self) -> Phase:
        return Phase(self.noise_multiplier, self.sample_rate, self.steps, name=self.phase_name)

    def add_public_phase(self, steps: int, name: str = "public") -> None:
        """Record non-private training on public data (no privacy cost; kept in the history for the record)."""
        if self.steps:
            self.phases.append(self.current_phase())
            self.steps = 0
        self.phases.append(Phase(0.0, 0.0, int(steps), private=False, name=name))

    # -- state -----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": 1, "n": self.n, "sample_rate": self.sample_rate, "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm, "clip_fn": self.clip_fn, "clipping": self.clipping,
            "steps": self.steps, "phases": [p.to_dict() for p in self.phases], "target_delta": self.target_delta,
            "phase_name": self.phase_name,
            "noise_rng": self.noise.generator.get_state(), "rows_rng": self._rows_rng.bit_generator.state,
            "noise_rng_devices": self.noise.state_dict()["devices"],
            "planned_steps": self.planned_steps, "transforms": [t.state_dict() for t in self.transforms],
            "releases": [p.to_dict() for p in self.releases],
            **({"distributed": self.dist.state_dict(self)} if self.dist is not None else {}),
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != 1:
            raise ExpungeError("not a privacy engine state (format 1 expected)")
        if state["n"] != self.n or state["max_grad_norm"] != self.max_grad_norm or state["clip_fn"] != self.clip_fn:
            raise ExpungeError("the saved engine was made for other data or clipping (rows, max_grad_norm, clip_fn "
                               "differ): call make_private with the same settings before loading its state")
        self.sample_rate, self.noise_multiplier = state["sample_rate"], state["noise_multiplier"]
        self.loader.steps_per_epoch = _steps_per_epoch(self.sample_rate)
        self.steps, self.phases = state["steps"], [Phase(**p) for p in state["phases"]]
        self.releases = [Phase(**p) for p in state.get("releases", [])]
        self.phase_name = state.get("phase_name", "")
        self.target_delta, self.planned_steps = state["target_delta"], state["planned_steps"]
        self.noise.load_state_dict(state["noise_rng"], state.get("noise_rng_devices", {}))
        self._rows_rng.bit_generator.state = state["rows_rng"]
        if len(state.get("transforms", [])) != len(self.transforms):
            raise ExpungeError("the saved engine had other transforms: pass the same transforms to make_private")
        for t, ts in zip(self.transforms, state.get("transforms", [])):
            t.load_state_dict(ts)
        if (self.dist is None) != ("distributed" not in state):
            raise ExpungeError("the saved engine ran " + ("on one process" if self.dist is not None else
                               "over a process group") + ": resume it the same way")
        if self.dist is not None:
            self.dist.load_state_dict(self, state["distributed"])
        self._set_noise_variance()

    def detach(self) -> None:
        """Remove the hooks: the model is an ordinary module again."""
        self.optimizer.base._expunge_private_wrapper = None
        for h in self.handlers:
            h.detach()
            h.reset()
            h.batch_rows = 0
        for hook in self._rows_hooks:
            hook.remove()
        if self.dist is not None:
            self.dist.detach()

    def summary(self, delta: float | None = None) -> dict:
        delta = delta if delta is not None else self.target_delta
        out = {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate,
               "expected_batch_size": self.expected_batch_size, "max_grad_norm": self.max_grad_norm,
               "clipping": self.clipping if isinstance(self.clipping, str) else list(self.clipping),
               "clip_fn": self.clip_fn, "steps": self.steps + sum(p.steps for p in self.phases if p.private),
               "phases": [p.to_dict() for p in self.history()], "delta": delta,
               "releases": sum(p.steps for p in self.releases)}
        if delta is not None:
            out["epsilon_pld"] = self.epsilon(delta, "pld")
            out["epsilon_rdp"] = self.epsilon(delta, "rdp")
        return out


def _wide_dtype(p: torch.Tensor) -> torch.dtype:
    return torch.float32 if p.dtype in LOW_PRECISION else p.dtype


def _row_hashes(features: torch.Tensor) -> list[bytes]:
    rows = features.detach().to("cpu", torch.float64).reshape(len(features), -1).contiguous().numpy()
    return [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in rows]


def check_batch_size(batch_size: int, n: int) -> None:
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ExpungeError(f"batch_size must be a positive integer, got {batch_size!r}")
    if batch_size > n:
        raise ExpungeError(f"batch_size {batch_size} is larger than the data ({n} rows): use at most {n}")


def _steps_per_epoch(sample_rate: float) -> int:
    return max(1, round(1 / sample_rate))


def _steps_for(epochs: float | None, sample_rate: float) -> int:
    """Logical steps in `epochs` passes, as the loader counts them (round(1/q) per epoch)."""
    if epochs is None or epochs <= 0:
        raise ExpungeError("give the length of training as epochs=... or steps=... (positive) so noise can be calibrated")
    return max(1, int(round(epochs * _steps_per_epoch(sample_rate))))


def make_private(model: nn.Module, optimizer: torch.optim.Optimizer, data, *, batch_size: int,
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 epochs: float | None = None, steps: int | None = None, noise_multiplier: float | None = None,
                 max_grad_norm: float = 1.0, clipping="all-layer", clip_fn: str = "abadi", gamma: float = 0.01,
                 physical_batch_size: int | None = None, loss_reduction: str = "mean", seed: int | None = None,
                 secure_rng: bool = False, accountant: str = "pld", prior_phases: list[Phase] | None = None,
                 transforms=None, reserve: list[Phase] | None = None,
                 distributed: bool | None = None) -> PrivacyEngine:
    """Make `model` train privately with `optimizer` on `data` (a tuple of tensors, a TensorDataset or a
    map-style Dataset). Give either target_epsilon + target_delta + (epochs or steps), for which the noise
    is calibrated on dp-accounting, or a fixed noise_multiplier. Everything is checked before any hook is
    attached. Returns the engine; train with engine.loader and engine.optimizer. `reserve`: releases planned
    besides the gradient steps (GeN's loss probes: `expunge.privacy.probes.probe_phase`); target_epsilon then
    covers the steps and these together. They are accounted when they happen, not here.

    Over a process group (torchrun; the model plain, wrapped in DistributedDataParallel or sharded by
    fully_shard) the engine trains data parallel: distributed=True asks for it, None (the default) uses it
    whenever a process group of more than one rank is initialised or the model is DDP/FSDP2, False refuses
    it. Sampling, normalisation and accounting stay global (see expunge.privacy.distributed)."""
    n = data_length(data)
    check_batch_size(batch_size, n)
    physical_batch_size = physical_batch_size or batch_size
    if not isinstance(physical_batch_size, (int, np.integer)) or physical_batch_size < 1:
        raise ExpungeError(f"physical_batch_size must be a positive integer, got {physical_batch_size!r}")
    if not max_grad_norm > 0 or math.isinf(max_grad_norm):
        raise ExpungeError(f"max_grad_norm must be a positive finite number, got {max_grad_norm}")
    if clip_fn not in CLIP_FNS:
        raise ExpungeError(f"unknown clip_fn {clip_fn!r}; use one of {', '.join(CLIP_FNS)}")
    if loss_reduction not in ("mean", "sum"):
        raise ExpungeError(f"loss_reduction must be 'mean' or 'sum' (how the loss combines rows), got {loss_reduction!r}")
    if accountant not in ACCOUNTANTS:
        raise ExpungeError(f"unknown accountant {accountant!r}; use one of {', '.join(ACCOUNTANTS)}")
    if target_delta is not None:
        check_delta(target_delta, n)
    model_params = {id(p) for p in model.parameters()}
    foreign = [i for i, g in enumerate(optimizer.param_groups) for p in g["params"] if id(p) not in model_params]
    if foreign:
        raise ExpungeError(f"the optimizer holds {len(foreign)} parameter(s) that are not in the model: build the "
                           "optimizer from model.parameters()")
    if isinstance(optimizer, DPOptimizer):
        raise ExpungeError("this optimizer is already private: pass the base optimizer")
    parallel = DataParallel.detect(model, distributed)  # (collectives, no change to the model)
    if parallel is not None and reserve:
        raise ExpungeError("loss probes (reserve) do not run data parallel yet: train them in one process "
                           "(distributed=False)")
    if parallel is not None and transforms:
        alone = [type(t).__name__ for t in transforms if not getattr(t, "data_parallel", False)]
        if alone:
            raise ExpungeError(f"the gradient transforms {alone} do not run data parallel yet (DiSK, DOPPLER and "
                               "DiceSGD do): train them in one process (distributed=False)")
        if parallel.kind == "fsdp":
            raise ExpungeError("gradient transforms run data parallel with replicated parameters (DDP), not under "
                               "FSDP2: DiceSGD needs the whole error's norm, DiSK the whole step; use DDP or one process")
    sample_rate = batch_size / n
    prior = list(prior_phases or [])
    if target_epsilon is not None:
        if noise_multiplier is not None:
            raise ExpungeError("give target_epsilon or noise_multiplier, not both")
        if target_delta is None:
            raise ExpungeError("target_epsilon needs target_delta (for example 1e-5, below 1/n)")
        if not target_epsilon > 0:
            raise ExpungeError(f"target_epsilon must be positive, got {target_epsilon}")
        planned = steps if steps is not None else _steps_for(epochs, sample_rate)
        if planned < 1:
            raise ExpungeError(f"steps must be at least 1, got {planned}")
        noise_multiplier = calibrate_noise(sample_rate, planned, target_epsilon, target_delta, accountant,
                                           prior + list(reserve or []))
    elif noise_multiplier is None:
        raise ExpungeError("give target_epsilon (with target_delta and epochs or steps) or a noise_multiplier")
    elif noise_multiplier < 0:
        raise ExpungeError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    else:
        planned = steps
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier 0: training clips but adds no noise, so it is not private", stacklevel=2)
    if parallel is not None:
        model, seed = parallel.model, parallel.shared_seed(seed, secure_rng)
    engine = PrivacyEngine(model, optimizer, data, n=n, sample_rate=sample_rate,
                           noise_multiplier=float(noise_multiplier), max_grad_norm=float(max_grad_norm),
                           clipping=clipping, clip_fn=clip_fn, gamma=gamma, physical_batch_size=int(physical_batch_size),
                           steps_per_epoch=_steps_per_epoch(sample_rate), loss_reduction=loss_reduction, seed=seed,
                           secure_rng=secure_rng, target_delta=target_delta, accountant=accountant,
                           planned_steps=planned, transforms=transforms, distributed=parallel)
    engine.phases = prior
    return engine
