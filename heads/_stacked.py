"""K trials of a small head trained at once: stacked parameters, one forward/backward per step for all K.

Why: a linear epoch on stored embeddings is hundreds of tiny steps whose cost is Python and kernel
launches, not arithmetic; K models stacked (`torch.func.stack_module_state` + `vmap` of
`functional_call`) take one step for all K. Each trial keeps its own batches (its seed's order, from
the sweep's shared read), initial weights (built by `heads.train.build_head` under its seed), learning
rate and schedule, momentum and weight decay; the update is SGD with momentum written out per trial,
as `torch.optim.SGD` computes it. Every epoch each trial is unstacked into its own head and optimizer
and committed by the trainer's own code (`_commit_epoch`: checkpoint, best weights, metrics, state),
so a trial's run directory is a normal one: a killed stacked group resumes trial by trial through
`heads.train` (exact, from the committed epoch).

Only heads whose forward has no randomness or batch statistics are stacked (``STACKABLE``: linear);
under `vmap` dropout masks and batchnorm statistics would not be those of a lone run. Results equal a
lone run within float tolerance (batched matmuls may sum in another order), not bit for bit.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from torch.func import functional_call, stack_module_state, vmap

from heads.config import TrainConfig

STACKABLE = ("linear",)


def can_stack(cfg: TrainConfig, overwrite: bool) -> bool:
    """A fresh trial (nothing committed in its run directory) of a stackable head, read in this process."""
    fresh = overwrite or not (Path(cfg.out) / "state.json").exists()
    return cfg.head in STACKABLE and cfg.num_workers == 0 and fresh


def group_key(cfg: TrainConfig) -> str:
    """Trials that can share a step: same model shape and data, same number of steps (lr etc. may differ)."""
    return json.dumps([cfg.head, cfg.features, cfg.head_config, cfg.batch_size, cfg.train_split, cfg.val_split,
                       cfg.epochs, cfg.loss, cfg.focal_gamma, cfg.device, cfg.max_steps_per_epoch], sort_keys=True)


def train_stacked(cfgs: list[TrainConfig], shared: Any, *, overwrite: bool = False) -> list[Any]:
    """Train the trials ``cfgs`` (one `group_key`) together; one `TrainResult` per trial, in order."""
    from featurestore.encoders import resolve_device
    from heads.train import FiniteBatches, _open_run_dir, build_head, make_loaders, run_lock

    device = resolve_device(cfgs[0].device)
    with contextlib.ExitStack() as locks:
        trials = []
        for cfg in cfgs:
            locks.enter_context(run_lock(cfg.out))
            head, identity = build_head(cfg, shared.store)
            train_loader, val_loader = make_loaders(cfg, shared.store, head)
            for loader in (train_loader, val_loader):
                if loader is not None:
                    shared._share(loader)
            state = _open_run_dir(Path(cfg.out), identity, overwrite)
            # the shared rows are checked once for NaN/inf; only a loader over non-finite rows checks each batch
            checked = train_loader if shared.all_finite(train_loader) else FiniteBatches.wrap(train_loader)
            trials.append(_Trial(cfg, head.to(device), checked, FiniteBatches.wrap(val_loader), state))
        return _Group(trials, device).run()


class _Trial:
    def __init__(self, cfg: TrainConfig, head: Any, train_loader: Any, val_loader: Any, state: dict):
        self.cfg, self.head, self.train_loader, self.val_loader, self.state = cfg, head, train_loader, val_loader, state
        self.history: list[dict] = []


class _Group:
    """The stacked parameters and momentum buffers of K trials, trained epoch by epoch."""

    def __init__(self, trials: list[_Trial], device: torch.device):
        from heads.losses import make_loss

        self.trials, self.device = trials, device
        self.template = trials[0].head
        # trials with the same seed and read groups get the same batches: each distinct loader is read once
        readers: dict[tuple, int] = {}
        self.reader_of = [readers.setdefault((t.cfg.seed, t.cfg.shuffle_buffer), k) for k, t in enumerate(trials)]
        self.readers = sorted(set(self.reader_of))
        params, _ = stack_module_state([t.head for t in trials])
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = {k: torch.zeros_like(v) for k, v in self.params.items()}
        cfg = trials[0].cfg
        loss_fn = make_loss(cfg.loss, cfg.focal_gamma)

        def one(p: dict, inputs: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
            return loss_fn(functional_call(self.template, p, (inputs,)), labels)

        self.losses = vmap(one, randomness="error")

    def run(self) -> list[Any]:
        from heads.train import _finish

        for epoch in range(1, self.trials[0].cfg.epochs + 1):
            started = time.perf_counter()
            losses = self._epoch(epoch)
            for k, trial in enumerate(self.trials):
                self._commit(k, trial, epoch, losses[k], started)
        return [_finish(Path(t.cfg.out), t.state, t.cfg, t.history) for t in self.trials]

    def _column(self, name: str, values: list[float]) -> torch.Tensor:
        shape = (len(values),) + (1,) * (self.params[name].dim() - 1)
        return torch.tensor(values, dtype=self.params[name].dtype, device=self.device).reshape(shape)

    def _epoch(self, epoch: int) -> list[float]:
        from heads.train import TrainingDivergedError

        cfgs = [t.cfg for t in self.trials]
        for r in self.readers:
            self.trials[r].train_loader.set_epoch(epoch)
        torch.manual_seed(cfgs[0].seed * 100_003 + epoch)  # as the trainer does (nothing random is drawn here)
        self.template.train()
        lr, momentum, decay = ({n: self._column(n, [f(c) for c in cfgs]) for n in self.params} for f in
                               (lambda c: c.lr_at(epoch), lambda c: c.momentum, lambda c: c.weight_decay))
        total = min(len(self.trials[r].train_loader) for r in self.readers)
        if cfgs[0].max_steps_per_epoch is not None:
            total = min(total, cfgs[0].max_steps_per_epoch)
        sums, seen = [0.0] * len(cfgs), 0
        slot = {r: j for j, r in enumerate(self.readers)}
        for step, read in enumerate(zip(*(self.trials[r].train_loader for r in self.readers))):
            if step >= total:
                break
            batches = [read[slot[r]] for r in self.reader_of]
            inputs = [torch.stack([b.inputs[i] for b in batches]).to(self.device) for i in range(len(batches[0].inputs))]
            labels = torch.stack([b.labels for b in batches]).to(self.device)
            losses = self.losses(self.params, inputs, labels)
            values = losses.detach().tolist()
            bad = [k for k, v in enumerate(values) if not math.isfinite(v)]
            if bad:
                raise TrainingDivergedError(f"the training loss of {cfgs[bad[0]].out} became {values[bad[0]]} at "
                                            f"epoch {epoch}, step {step + 1}; lower --lr, or check the features")
            for p in self.params.values():
                p.grad = None
            losses.sum().backward()
            self._sgd_step(lr, momentum, decay)
            n = len(batches[0])
            sums = [s + v * n for s, v in zip(sums, values)]
            seen += n
        if seen == 0:
            raise ValueError("the training loader produced no batches")
        return [s / seen for s in sums]

    @torch.no_grad()
    def _sgd_step(self, lr: dict, momentum: dict, decay: dict) -> None:
        """``torch.optim.SGD`` (momentum, weight decay, no dampening or Nesterov), one lr per trial."""
        for name, p in self.params.items():
            d = p.grad + decay[name] * p
            buf = self.buffers[name]
            buf.mul_(momentum[name]).add_(d)
            p.sub_(lr[name] * buf)

    def _commit(self, k: int, trial: _Trial, epoch: int, loss: float, started: float) -> None:
        """Unstack trial ``k`` into its head and a torch SGD optimizer, validate it, and commit the epoch."""
        from heads.evaluate import evaluate
        from heads.train import _commit_epoch, _epoch_line, _log

        cfg, head = trial.cfg, trial.head
        with torch.no_grad():
            head.load_state_dict({n: p[k].detach().clone() for n, p in self.params.items()}, strict=False)
        named = dict(head.named_parameters())
        optimizer = torch.optim.SGD([named[n] for n in named if named[n].requires_grad], lr=cfg.lr,
                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr_at(epoch)
        for n, p in named.items():
            if p.requires_grad:
                optimizer.state[p] = {"momentum_buffer": self.buffers[n][k].clone()}
        record = {"epoch": epoch, "loss": loss, "lr": cfg.lr_at(epoch)}
        if trial.val_loader is not None:
            record.update(evaluate(head, trial.val_loader, self.device))
        record["seconds"] = round(time.perf_counter() - started, 3)
        trial.state = _commit_epoch(Path(cfg.out), head, optimizer, trial.state, record, cfg)
        trial.history.append(record)
        if cfg.progress:
            _log(_epoch_line(record, cfg.epochs))
