"""K trials of a small head trained at once: stacked parameters, one forward/backward per step for all K.

Why: an epoch of a small head on stored embeddings is hundreds of small steps whose cost is Python,
kernel launches and, for the MLPs, matmuls too small to use the CPU well; K models stacked take one
step for all K with batched matmuls (``torch.baddbmm`` over a leading trial dimension). Each trial
keeps its own batches (its seed's order, from the sweep's shared read), initial weights (built by
`heads.train.build_head` under its seed), learning rate and schedule, momentum and weight decay; the
update is SGD with momentum written out per trial, as `torch.optim.SGD` computes it (one ``_foreach`` call
per operation for all parameters). The stacked logits are class-major, ``[K, C, B]``, and the loss's
gradient by them is written out (`stacked_loss`); the ``linear`` head's step needs no autograd at all
(`_linear_step`), the others run autograd back from that gradient. Each step's batches are cut in a
background thread while the previous step trains (`featurestore.torchdata.prefetched`).

Why batched matmuls and not ``vmap`` of the module: a lone run's dropout masks come from torch's
global generator seeded with ``(seed, epoch)``, drawn layer by layer in forward order, and its
batchnorm updates running statistics in place. Here each trial has its own `torch.Generator` seeded
the same way and draws the same masks in the same order (bit for bit those of a lone run), and the
batchnorm of each trial uses its own batch's statistics and updates its own stacked running buffers.
The stacked forward is written once per layer kind (`Linear`, `BatchNorm1d`, `ReLU`, `Dropout`) and
each head's wiring in `FORWARDS`; a head (or layer) not in them is not stacked.

Validation is stacked too: every trial reads the same clip-level validation batches, so each batch is
cut once and scored by all K, then `heads.evaluate.clip_metrics` scores each trial as `evaluate` does.
Every epoch each trial is unstacked into its own head and optimizer and committed by the trainer's own
code (`_commit_epoch`: checkpoint, best weights, metrics, state) in a background thread while the next
epoch trains, so a trial's run directory is a normal one. A killed stacked group resumes stacked: each
trial is restored from its own committed epoch by the trainer's `_restore` (weights, batchnorm buffers,
SGD momentum) and the trials at the same epoch form a group again (`resume_epoch`, and the sweep groups
by it); a trial alone at its epoch resumes through `heads.train`.

Results equal a lone run within float tolerance (batched matmuls and the batchnorm written out sum in
another order: weights within ~1e-6), not bit for bit.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import importlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from featurestore.torchdata import prefetched
from heads.config import TrainConfig


def trainer_internals() -> SimpleNamespace:
    """The parts of `heads.train` a stacked group needs beyond its public `train`/`fit`, named in one place.

    Why private ones: a stacked trial must write exactly the run directory a lone run writes, so it
    opens, commits and finishes it with the trainer's own functions instead of copies of them.
    """
    t = importlib.import_module("heads.train")  # the module: ``heads.train`` is also the function
    return SimpleNamespace(open_run_dir=t._open_run_dir, commit_epoch=t._commit_epoch, finish=t._finish,
                           log=t._log, epoch_line=t._epoch_line, FiniteBatches=t.FiniteBatches,
                           TrainingDivergedError=t.TrainingDivergedError, build_head=t.build_head,
                           make_loaders=t.make_loaders, run_lock=t.run_lock, restore=t._restore,
                           read_metrics=t._read_metrics)


def can_stack(cfg: TrainConfig) -> bool:
    """A trial of a stackable head, read in this process, in float32: the stacked step has no autocast,
    so a bf16 trial trains alone as it asked."""
    return cfg.head in FORWARDS and cfg.num_workers == 0 and cfg.precision == "fp32"


def resume_epoch(cfg: TrainConfig, overwrite: bool) -> int | None:
    """The epoch a trial's run directory has committed (0: fresh), which its stacked group must share; None when
    ``state.json`` cannot be read: the trial then goes through `heads.train`, which names what is wrong."""
    path = Path(cfg.out) / "state.json"
    if overwrite or not path.exists():
        return 0
    try:
        epoch = json.loads(path.read_text()).get("epoch", 0)
    except (OSError, ValueError, AttributeError):
        return None
    return epoch if isinstance(epoch, int) and epoch >= 0 else None


def group_key(cfg: TrainConfig) -> str:
    """Trials that can share a step: same model shape and data, same number of steps (lr etc. may differ)."""
    return json.dumps([cfg.head, cfg.features, cfg.head_config, cfg.batch_size, cfg.train_split, cfg.val_split,
                       cfg.epochs, cfg.loss, cfg.focal_gamma, cfg.device, cfg.max_steps_per_epoch, cfg.precision],
                      sort_keys=True)


def train_stacked(cfgs: list[TrainConfig], shared: Any, *, overwrite: bool = False) -> list[Any]:
    """Train the trials ``cfgs`` (one `group_key`) together; one `TrainResult` per trial, in order."""
    from featurestore.encoders import resolve_device

    t = trainer_internals()
    device = resolve_device(cfgs[0].device)
    reader = [(cfg.seed, cfg.shuffle_buffer) for cfg in cfgs]
    order = sorted(range(len(cfgs)), key=lambda i: reader.index(reader[i]))  # trials of one reader together
    with contextlib.ExitStack() as locks:
        trials, readers, val = [], {}, None
        for i in order:
            cfg = cfgs[i]
            locks.enter_context(t.run_lock(cfg.out))
            head, identity = t.build_head(cfg, shared.store)  # restored below when resumed
            if reader[i] not in readers:  # trials of one seed read the same batches: one loader for them
                train_loader, val_loader = t.make_loaders(cfg, shared.store, head, device)
                readers[reader[i]] = _checked(shared, train_loader, t)
                val = val if val is not None or val_loader is None else _checked(shared, val_loader, t)
            trials.append(_opened_trial(cfg, head, identity, readers[reader[i]], overwrite, t).to(device))
        results = _Group(trials, val, device, t).run()
    return [results[order.index(i)] for i in range(len(cfgs))]


def _checked(shared: Any, loader: Any, t: SimpleNamespace) -> Any:
    """``loader`` reading the shared rows; checked per batch for NaN/inf only when those rows hold one
    (they are checked once, `SharedReads.all_finite`), so the error still names the clip."""
    shared.share(loader)
    return loader if shared.all_finite(loader) else t.FiniteBatches.wrap(loader)


def _opened_trial(cfg: TrainConfig, head: nn.Module, identity: dict, train_loader: Any, overwrite: bool,
                  t: SimpleNamespace) -> _Trial:
    """A trial with its run directory opened as `heads.train` opens it: fresh, or restored from its committed
    epoch by the trainer's own `_restore` (weights and buffers into ``head``, the SGD momentum through a torch
    optimizer, metric lines of later epochs dropped)."""
    run_dir = Path(cfg.out)
    state = t.open_run_dir(run_dir, identity, overwrite)
    if state.get("epoch", 0) == 0:
        return _Trial(cfg, head, train_loader, state)
    params = {n: p for n, p in head.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(params.values(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    t.restore(run_dir, state, head, optimizer)
    momentum = {n: optimizer.state.get(p, {}).get("momentum_buffer") for n, p in params.items()}
    momentum = {n: torch.zeros_like(params[n]) if v is None else v.detach().clone() for n, v in momentum.items()}
    return _Trial(cfg, head, train_loader, state, momentum, t.read_metrics(run_dir))


class _Trial:
    """One trial of a group: its config, head (the weights it starts from), loader, run state and history, and
    the SGD momentum it resumes with (None: zeros, a fresh trial)."""

    def __init__(self, cfg: TrainConfig, head: nn.Module, train_loader: Any, state: dict,
                 momentum: dict[str, torch.Tensor] | None = None, history: list[dict] | None = None):
        self.cfg, self.head, self.train_loader, self.state = cfg, head, train_loader, state
        self.momentum, self.history = momentum, list(history or [])

    @property
    def start(self) -> int:
        """The last epoch committed before this group trains (0: fresh)."""
        return int(self.state.get("epoch", 0))

    def to(self, device: torch.device) -> _Trial:
        self.head.to(device)
        self.momentum = None if self.momentum is None else {n: v.to(device) for n, v in self.momentum.items()}
        return self


# ------------------------------------------------------------------------ the stacked forward
class _Pass:
    """What one stacked forward needs besides the parameters: the mode, each trial's dropout generator,
    the stacked batchnorm buffers (updated in place in training, as a lone run's are) and, optionally,
    the buffers the Linear layers' gradients are written into (`_BatchedLinear`)."""

    def __init__(self, params: dict, buffers: dict, generators: list[torch.Generator] | None,
                 grads: dict | None = None):
        self.params, self.buffers, self.generators, self.grads = params, buffers, generators, grads or {}

    @property
    def training(self) -> bool:
        return self.generators is not None


def _linear(ctx: _Pass, name: str, x: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
    """``[K, B, in] -> [K, B, out]``: each trial's Linear on its own input; ``logits``: a head's last layer,
    whose output is class-major, ``[K, out, B]`` (see `stacked_loss`).

    A first layer's input is per reader, ``[R, B, in]`` with the K trials in reader order, K/R each
    (``[B, in]``: validation, one input for all): then each reader's K/R weight matrices are one matrix
    (a view) and the layer is R matmuls of ``K/R * out`` columns instead of K small ones, which is most
    of the speed of stacking small heads. Class-major, that matmul's ``[R, K/R * out, B]`` result is already
    ``[K, out, B]`` (a view); row-major its columns are regrouped by trial (a copy).
    """
    x = x.unsqueeze(0) if x.dim() == 2 else x
    k, out, _ = ctx.params[f"{name}.weight"].shape
    r, n = x.shape[0], k // x.shape[0]
    y = _BatchedLinear.apply(x, *_per_reader(ctx, name, r), logits)
    if logits:
        return y.view(k, out, -1)
    if r == k:
        return y
    return y.view(r, -1, n, out).transpose(1, 2).reshape(k, -1, out)


def _per_reader(ctx: _Pass, name: str, r: int) -> list[torch.Tensor | None]:
    """Layer ``name``'s weight, bias and their gradient buffers (None: none) as ``r`` matrices of K/r trials
    each: ``[K, out, ...]`` viewed as ``[r, K/r * out, ...]`` (views, no copies)."""
    tensors = [ctx.params[f"{name}.weight"], ctx.params[f"{name}.bias"], ctx.grads.get(f"{name}.weight"),
               ctx.grads.get(f"{name}.bias")]
    k, out = tensors[0].shape[:2]
    return [None if t is None else t.view(r, k // r * out, *t.shape[2:]) for t in tensors]


class _BatchedLinear(torch.autograd.Function):
    """``x [K, B, in], w [K, out, in], b [K, out] -> x @ w^T + b`` (``[K, B, out]``; ``class_major``: its
    transpose ``w @ x^T + b``, ``[K, out, B]``), with a backward that computes the weight's gradient in its
    parameter's layout, as `nn.Linear`'s does (``grad_w = g^T @ x``), into ``grad_w`` / ``grad_b`` when given
    (then autograd gets None for ``w`` and ``b``: the caller reads the buffers).

    Why not ``torch.baddbmm(b, x, w.transpose(1, 2))`` and autograd: its backward computes the weight's
    gradient as ``x^T @ g`` (``[K, in, out]``) and then copies it, transposed element by element, into the
    parameter's ``[K, out, in]`` layout; for a late-fusion first layer of 16 trials (16 MB) that copy took
    longer than all of the step's matmuls (profiled: 40 % of a stacked step). Why the buffers: a fresh
    16 MB gradient every step is a fresh mmap (page faults each step) or, once glibc raises its mmap
    threshold, heap that it keeps after the sweep's peak; gradients written into the same buffers every
    step cost neither.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, grad_w: torch.Tensor | None,
                grad_b: torch.Tensor | None, class_major: bool = False) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        ctx.out, ctx.class_major = (grad_w, grad_b), class_major
        if class_major:
            return torch.baddbmm(b.unsqueeze(2), w, x.transpose(1, 2))
        return torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        out_w, out_b = ctx.out
        g_t = grad if ctx.class_major else grad.transpose(1, 2)  # [K, out, B]
        grad_x = torch.bmm(g_t.transpose(1, 2), w) if ctx.needs_input_grad[0] else None
        grad_w = torch.bmm(g_t, x, out=out_w) if ctx.needs_input_grad[1] else None
        grad_b = torch.sum(g_t, 2, out=out_b) if ctx.needs_input_grad[2] else None
        return (grad_x, None if out_w is not None else grad_w, None if out_b is not None else grad_b,
                None, None, None)


def _batchnorm(ctx: _Pass, name: str, module: nn.BatchNorm1d, x: torch.Tensor) -> torch.Tensor:
    """`nn.BatchNorm1d` per trial: ``F.batch_norm`` over ``[B, K * features]``, so each trial's feature is a
    channel of its own (its batch statistics, its slice of the stacked running buffers, updated in place)."""
    k, b, h = x.shape
    flat = lambda t: t.reshape(k * h)  # noqa: E731 - views of the stacked [K, h] tensors
    if ctx.training:
        ctx.buffers[f"{name}.num_batches_tracked"].add_(1)
    y = F.batch_norm(x.transpose(0, 1).reshape(b, k * h), flat(ctx.buffers[f"{name}.running_mean"]),
                     flat(ctx.buffers[f"{name}.running_var"]), flat(ctx.params[f"{name}.weight"]),
                     flat(ctx.params[f"{name}.bias"]), ctx.training, module.momentum, module.eps)
    return y.reshape(b, k, h).transpose(0, 1)


def _dropout(ctx: _Pass, p: float, x: torch.Tensor) -> torch.Tensor:
    """`F.dropout` per trial with each trial's own generator: the mask a lone run draws at this point."""
    if not ctx.training or p == 0:
        return x
    if p == 1:
        return x * 0
    masks = torch.empty_like(x)
    for mask, g in zip(masks, ctx.generators):  # each a contiguous [B, h] slice: the draw of a fresh [B, h] tensor
        mask.bernoulli_(1 - p, generator=g)
    return x * masks.div_(1 - p)


def _sequential(ctx: _Pass, name: str, seq: nn.Sequential, x: torch.Tensor, *, logits: bool = False) -> torch.Tensor:
    """``seq`` per trial; ``logits``: its last layer is the head's output (a Linear, class-major)."""
    for i, layer in enumerate(seq):
        sub = f"{name}.{i}"
        if isinstance(layer, nn.Linear):
            x = _linear(ctx, sub, x, logits=logits and i == len(seq) - 1)
        elif isinstance(layer, nn.BatchNorm1d) and layer.track_running_stats and layer.momentum is not None:
            x = _batchnorm(ctx, sub, layer, x)
        elif isinstance(layer, nn.ReLU):
            x = torch.relu(x)
        elif isinstance(layer, nn.Dropout):
            x = _dropout(ctx, layer.p, x)
        else:
            raise TypeError(f"{type(layer).__name__} ({sub}) has no stacked forward")
    if logits and not isinstance(seq[-1], nn.Linear):
        raise TypeError(f"{name} ends in {type(seq[-1]).__name__}, not the Linear layer of a head's output")
    return x


def _joined(inputs: list[torch.Tensor], l2: bool) -> torch.Tensor:
    if l2:
        inputs = [F.normalize(x, dim=-1) for x in inputs]
    return torch.cat(inputs, dim=-1) if len(inputs) > 1 else inputs[0]


def _linear_forward(head: Any, ctx: _Pass, inputs: list[torch.Tensor]) -> torch.Tensor:
    return _linear(ctx, "fc", _joined(inputs, head.cfg.l2_normalize), logits=True)


def _mlp_forward(head: Any, ctx: _Pass, inputs: list[torch.Tensor]) -> torch.Tensor:
    return _sequential(ctx, "net", head.net, _joined(inputs, head.cfg.l2_normalize), logits=True)


def _late_fusion_forward(head: Any, ctx: _Pass, inputs: list[torch.Tensor]) -> torch.Tensor:
    branches = [_sequential(ctx, f"branches.{i}", b, x) for i, (b, x) in enumerate(zip(head.branches, inputs))]
    return _linear(ctx, "classifier", _linear(ctx, "fusion", torch.cat(branches, dim=-1)), logits=True)


#: The stacked forward of each stackable head: ``(template head, pass, inputs) -> logits [K, C, B]`` (class-major);
#: each mirrors the head's own ``forward`` (heads/embedding_mlp.py, heads/late_fusion.py).
FORWARDS: dict[str, Callable[[Any, _Pass, list[torch.Tensor]], torch.Tensor]] = {
    "linear": _linear_forward, "embedding_mlp": _mlp_forward, "late_fusion": _late_fusion_forward}


@torch.no_grad()
def stacked_loss(cfg: TrainConfig, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each trial's mean loss over its batch, ``[K]``, and its gradient by the logits, from class-major logits
    ``[K, C, B]`` and labels ``[K, B]``: ``heads.losses.FocalLoss`` (or ``nn.CrossEntropyLoss``) of K trials,
    with the gradient autograd computes through the lone loss, written out.

    Why class-major: ``log_softmax`` over a last dimension of 10 classes ran 17x slower on this CPU than over
    the middle dimension of ``[K, C, B]`` (125 vs 7 us for 16 x 48 samples; its backward likewise), which made
    the loss of a stacked ``linear`` step cost as much as its matmuls. Why written out: a focal loss through
    autograd is a dozen small nodes forward and backward; here it is one pass. The gradient is the chain rule
    of the lone loss term by term, as torch's derivative formulas have it (``u = clamp_min(1 - p_t, 0)`` passes
    the gradient only where ``u > 0``, so a sample with ``p_t`` rounded to 1 adds nothing; ``u ** gamma`` has the
    derivative ``gamma * u ** (gamma - 1)``, and 0 for ``gamma = 0``): with ``c = dL/dlog p_t``,
    ``dL/dz = c * (onehot - softmax) / B``.
    """
    log_p = F.log_softmax(logits, dim=1)
    at = labels.unsqueeze(1)
    log_pt = log_p.gather(1, at).squeeze(1)  # [K, B]
    if cfg.loss == "cross_entropy":
        loss, c = -log_pt, torch.full_like(log_pt, -1.0)
    else:
        gamma = cfg.focal_gamma
        p_t = log_pt.exp()
        u = (1 - p_t).clamp_min(0)
        weight = u ** gamma
        loss = -(weight * log_pt)
        slope = torch.where(u > 0, gamma * u ** (gamma - 1), 0.0) if gamma != 0 else torch.zeros_like(u)
        c = log_pt * slope * p_t - weight
    c = c.div_(logits.shape[2]).unsqueeze(1)  # the batch mean
    grad = log_p.exp_().mul_(c.neg()).scatter_add_(1, at, c)  # c * (onehot - softmax), in log_p's memory
    return loss.mean(1), grad


def _autograd_step(group: _Group, ctx: _Pass, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """A step's losses ``[K]``, its gradients in ``group.grads`` (Linear layers) and ``.grad`` (the rest):
    the stacked forward, then autograd back from the loss's own gradient by the logits."""
    for name, p in group.params.items():
        if name not in group.grads:
            p.grad = None  # these accumulate; the Linear layers' gradients are written into group.grads
    logits = group.forward(group.template, ctx, inputs)
    losses, grad = stacked_loss(group.cfg, logits.detach(), labels)
    logits.backward(grad)
    return losses


def _linear_step(group: _Group, ctx: _Pass, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """`_autograd_step` of the ``linear`` head without autograd: its gradients are one matmul of the loss's own
    gradient with the (joined) inputs, ``grad_w = g @ x``, per reader as the forward (`_linear`).

    Why: a stacked linear step is two small matmuls (~0.2 ms for 16 trials); autograd's graph, engine and
    nodes around them added 0.1 ms more (0.73 vs 0.63 ms a step in three alternating runs, load 6).
    """
    with torch.no_grad():
        x = _joined(inputs, group.template.cfg.l2_normalize)
        x = x.unsqueeze(0) if x.dim() == 2 else x
        logits = _linear(ctx, "fc", x, logits=True)
        losses, grad = stacked_loss(group.cfg, logits, labels)
        _, _, grad_w, grad_b = _per_reader(ctx, "fc", x.shape[0])
        g = grad.view(grad_w.shape[0], grad_w.shape[1], -1)  # [R, K/R * C, B]
        torch.bmm(g, x, out=grad_w)
        torch.sum(g, 2, out=grad_b)
    return losses


#: How each stackable head's step computes its gradients (default `_autograd_step`).
STEPS: dict[str, Callable[..., torch.Tensor]] = {"linear": _linear_step}


# --------------------------------------------------------------------------------- the group
#: Threads writing the trials' epoch files: a commit is mostly waiting for fsync (four files a trial), and
#: the trials' run directories are independent; one trial's epochs stay in order (`_Group.run` waits for an
#: epoch's commits before it queues the next).
COMMIT_THREADS = 4


class _Group:
    """The stacked parameters, buffers and momentum of K trials, trained epoch by epoch."""

    def __init__(self, trials: list[_Trial], val_loader: Any, device: torch.device, t: SimpleNamespace):
        self.trials, self.val_loader, self.device, self.t = trials, val_loader, device, t
        self.template, self.cfg = trials[0].head, trials[0].cfg  # what all trials share (`group_key`)
        self.forward = FORWARDS[self.cfg.head]
        self.step = STEPS.get(self.cfg.head, _autograd_step)
        self.loaders = list(dict.fromkeys(tr.train_loader for tr in trials))  # distinct, in trial order
        self.reader_of = torch.tensor([self.loaders.index(tr.train_loader) for tr in trials])
        # each reader's batch feeds its trials' first layers as it is when every reader has as many trials
        # (`_linear`); otherwise it is repeated for each of its trials
        self.per_reader = len(set(torch.bincount(self.reader_of).tolist())) == 1
        named = [dict(tr.head.named_parameters()) for tr in trials]
        self.trainable = [n for n, p in named[0].items() if p.requires_grad]
        self.params = {n: torch.stack([p[n].detach() for p in named]).requires_grad_(True) for n in self.trainable}
        buffers = [dict(tr.head.named_buffers()) for tr in trials]
        self.buffers = {n: torch.stack([b[n] for b in buffers]).clone() for n in buffers[0]}
        if len({tr.start for tr in trials}) > 1:
            raise ValueError(f"stacked trials must resume from one epoch, got {sorted({tr.start for tr in trials})}")
        self.start = trials[0].start
        self.momentum = {n: torch.stack([torch.zeros_like(tr.head.get_parameter(n)) if tr.momentum is None
                                         else tr.momentum[n] for tr in trials]) for n in self.params}
        self.grads = {n: torch.empty_like(self.params[n]) for n in _linear_params(self.template) if n in self.params}
        self.writer = ThreadPoolExecutor(max_workers=COMMIT_THREADS, thread_name_prefix="stacked-commit")

    def run(self) -> list[Any]:
        pending: list[Future] = []
        try:
            for epoch in range(self.start + 1, self.trials[0].cfg.epochs + 1):
                started = time.perf_counter()
                losses = self._epoch(epoch)
                metrics = self._validate(epoch)
                seconds = time.perf_counter() - started
                _wait(pending)  # the previous epoch's files are written before this one's are queued
                snapshot = self._snapshot()
                pending = [self.writer.submit(self._commit, k, epoch, losses[k], metrics[k], seconds, snapshot)
                           for k in range(len(self.trials))]
            _wait(pending)
        finally:
            self.writer.shutdown(wait=True)
        return [self.t.finish(Path(tr.cfg.out), tr.state, tr.cfg, tr.history) for tr in self.trials]

    def _column(self, name: str, values: list[float]) -> torch.Tensor:
        shape = (len(values),) + (1,) * (self.params[name].dim() - 1)
        return torch.tensor(values, dtype=self.params[name].dtype, device=self.device).reshape(shape)

    def _epoch(self, epoch: int) -> list[float]:
        cfgs = [tr.cfg for tr in self.trials]
        for loader in self.loaders:
            loader.set_epoch(epoch)
        generators = [torch.Generator().manual_seed(c.seed * 100_003 + epoch) for c in cfgs]  # as the trainer seeds
        lr, momentum, decay = ([self._column(n, [f(c) for c in cfgs]) for n in self.params] for f in
                               (lambda c: c.lr_at(epoch), lambda c: c.momentum, lambda c: c.weight_decay))
        total = min(len(loader) for loader in self.loaders)
        if cfgs[0].max_steps_per_epoch is not None:
            total = min(total, cfgs[0].max_steps_per_epoch)
        sums, seen = torch.zeros(len(cfgs), dtype=torch.float64, device=self.device), 0
        ctx = _Pass(self.params, self.buffers, generators, self.grads)
        # the next step's batches are cut (numpy gathers, a float32 conversion; mostly without the GIL) in a
        # background thread while this one trains, keeping a second core busy as a lone run's prefetch does
        for step, (inputs, labels, n) in enumerate(prefetched(self._steps(total), depth=2)):
            values = self.step(self, ctx, inputs, labels).double()
            if not bool(torch.isfinite(values).all()):  # one check for the stack, before the update
                k = int((~torch.isfinite(values)).nonzero()[0])
                raise self.t.TrainingDivergedError(
                    f"the training loss of {cfgs[k].out} became {float(values[k])} at epoch {epoch}, step "
                    f"{step + 1}; lower --lr, or check the features")
            self._sgd_step(lr, momentum, decay)
            sums.add_(values, alpha=n)
            seen += n
        if seen == 0:
            raise ValueError("the training loader produced no batches")
        return (sums / seen).tolist()

    def _steps(self, total: int) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, int]]:
        """The first ``total`` steps' inputs (each ``[R, B, ...]``), labels ``[K, B]`` and batch size: one batch
        of every reader, stacked."""
        for step, read in enumerate(zip(*self.loaders)):
            if step >= total:
                return
            inputs = [self._stacked([b.inputs[i] for b in read]) for i in range(len(read[0].inputs))]
            yield inputs, torch.stack([b.labels for b in read])[self.reader_of].to(self.device), len(read[0])

    def _stacked(self, per_reader: list[torch.Tensor]) -> torch.Tensor:
        """One input of every reader as float32 ``[R, B, ...]`` (or ``[K, B, ...]``, see ``per_reader``); the
        batches come in the stored dtype (float16 here) and are converted once, stacked."""
        x = per_reader[0].unsqueeze(0) if len(per_reader) == 1 else torch.stack(per_reader)
        return (x if self.per_reader else x[self.reader_of]).to(self.device).float()

    @torch.no_grad()
    def _sgd_step(self, lr: list[torch.Tensor], momentum: list[torch.Tensor], decay: list[torch.Tensor]) -> None:
        """``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov), one lr per trial: each a list
        of ``[K, 1, ...]`` columns in ``self.params`` order, applied to all parameters at once (``_foreach``)."""
        params = list(self.params.values())
        grads = [self.grads[n] if n in self.grads else p.grad for n, p in self.params.items()]
        momentum_buffers = list(self.momentum.values())
        torch._foreach_addcmul_(grads, decay, params)  # this step's own gradients, updated in place
        torch._foreach_mul_(momentum_buffers, momentum)
        torch._foreach_add_(momentum_buffers, grads)
        torch._foreach_addcmul_(params, lr, momentum_buffers, value=-1)

    @torch.no_grad()
    def _validate(self, epoch: int) -> list[dict]:
        """`heads.evaluate.evaluate` of every trial on the shared validation batches, each batch cut once;
        a trial whose probabilities are not finite (finite weights whose logits overflow) diverged, as
        in `heads.train`: argmax of NaN is class 0, and the epoch would be scored and maybe kept."""
        from heads.evaluate import NonFiniteOutputError, check_finite, clip_metrics

        k = len(self.trials)
        if self.val_loader is None:
            return [{} for _ in range(k)]
        ctx = _Pass(self.params, self.buffers, None)
        rows, labels, counts, sums, hits, total = [], [], [], [[] for _ in range(k)], np.zeros(k, dtype=np.int64), 0
        for batch in self.val_loader:
            b, s = batch.inputs[0].shape[:2]
            flat = [x.to(self.device).float().flatten(0, 1) for x in batch.inputs]
            probs = torch.softmax(self.forward(self.template, ctx, flat).float(), dim=1).cpu().view(k, -1, b, s)
            # max(1).indices: argmax's first maximum, without argmax's 50x slower reduction over a middle dim
            hits += (probs.max(1).indices == batch.labels[None, :, None]).sum((1, 2)).numpy()
            total += b * s
            rows.append(batch.rows.numpy())
            labels.append(batch.labels.numpy())
            counts.append(np.full(b, s))
            clip_sums = probs.sum(3).transpose(1, 2).numpy()  # [K, b, C]
            for j in range(k):
                sums[j].append(clip_sums[j])
            _release_free_heap()
        if not rows:
            raise ValueError("the validation loader produced no samples (empty split?)")
        rows, labels, counts = np.concatenate(rows), np.concatenate(labels), np.concatenate(counts)
        sums = [np.concatenate(s) for s in sums]
        for j in range(k):
            try:
                check_finite(rows, sums[j])
            except NonFiniteOutputError as err:
                raise self.t.TrainingDivergedError(
                    f"trial {self.trials[j].cfg.out}: the validation probabilities became NaN or infinite after "
                    f"epoch {epoch} ({err}); epoch {epoch} was not saved: lower --lr, or check the features") from None
        return [clip_metrics(rows, labels, sums[j], counts, hits[j] / max(1, total)) for j in range(k)]

    def _snapshot(self) -> dict[str, torch.Tensor]:
        """Copies of the stacked weights, buffers and momentum, for the writer thread while training goes on."""
        tensors = {**self.params, **self.buffers}
        return {**{n: v.detach().clone() for n, v in tensors.items()},
                **{f"momentum.{n}": v.clone() for n, v in self.momentum.items()}}

    def _commit(self, k: int, epoch: int, loss: float, metrics: dict, seconds: float, snap: dict) -> None:
        """Unstack trial ``k`` into its head and a torch SGD optimizer and commit the epoch (writer thread)."""
        trial, t = self.trials[k], self.t
        cfg, head = trial.cfg, trial.head
        with torch.no_grad():
            head.load_state_dict({n: v[k] for n, v in snap.items() if not n.startswith("momentum.")})
        named = dict(head.named_parameters())
        optimizer = torch.optim.SGD([named[n] for n in self.trainable], lr=cfg.lr, momentum=cfg.momentum,
                                    weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        if cfg.momentum != 0:  # torch keeps no buffer without momentum
            for n in self.trainable:
                optimizer.state[named[n]] = {"momentum_buffer": snap[f"momentum.{n}"][k].clone()}
        record = {"epoch": epoch, "loss": loss, "lr": cfg.lr_at(epoch), **metrics, "seconds": round(seconds, 3)}
        try:
            trial.state = t.commit_epoch(Path(cfg.out), head, optimizer, trial.state, record, cfg)
        except t.TrainingDivergedError as err:  # its weights: the trainer's message names no run, K trials here
            raise t.TrainingDivergedError(f"trial {cfg.out}: {err}") from err
        trial.history.append(record)
        if cfg.progress:
            t.log(t.epoch_line(record, cfg.epochs))


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None


def _release_free_heap() -> None:
    """Give glibc's free heap memory back to the system (``malloc_trim``; nothing where there is no glibc).

    Why: a stacked validation batch of K trials allocates and frees a few K x 190 x hidden float32
    temporaries (6 MB each for 16 late-fusion trials); glibc kept them as heap instead of reusing it,
    so the sweep's RSS grew by ~15 MB a batch through each validation pass (+450 MB, the sweep's peak;
    measured with an RSS sampler per phase). Trimming after each batch keeps it flat for about a
    millisecond a batch.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _linear_params(head: nn.Module) -> list[str]:
    """The weight and bias names of ``head``'s Linear layers (their gradients go to `_Group.grads`)."""
    return [f"{m}.{p}" for m, module in head.named_modules() if isinstance(module, nn.Linear) for p in ("weight", "bias")]


def _wait(futures: list[Future]) -> None:
    """Wait for every commit; the first error (a diverged or unwritable trial) is raised after all have ended."""
    errors = [f.exception() for f in futures]
    for err in errors:
        if err is not None:
            raise err
