"""Optimizer and weight average whose cost per step does not grow with the catalogue.

With sampled softmax a step touches the item table only in the rows of the batch's items
and candidates (a few thousand of a million). The item embedding then gives a sparse
gradient (``nn.Embedding(sparse=True)``), and:

* :class:`LazyAdamW` -- AdamW where a sparse-gradient parameter is updated in the rows its
  gradient names only (moments, decoupled weight decay and the step): "lazy Adam", as in
  TensorFlow Addons' LazyAdam and PyTorch's SparseAdam (which has no weight decay); dense
  parameters follow ``torch.optim.AdamW``'s arithmetic exactly;
* :class:`WeightAverage` -- the exponential moving average of the weights, updated after
  every step: dense parameters in full, a sparse-gradient parameter in the touched rows
  only; an untouched row's weights did not change, so its average is brought up to date in
  closed form when it is next touched (:meth:`WeightAverage.before_step`) or when the
  average is read (:meth:`WeightAverage.sync`): ``avg <- P avg + (1 - P) w`` with P the
  product of the decays of the steps it missed. The result equals the dense average.

Both are plain single-process objects: distributed training reduces the gradients first
(DDP in backward; Horovod's ``synchronize``), so every rank applies the same rows.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch


class LazyAdamW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError(f"LazyAdamW: lr {lr}, eps {eps}, weight_decay {weight_decay}")
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                bc1, bc2 = 1 - b1**t, 1 - b2**t
                m, v = state["exp_avg"], state["exp_avg_sq"]
                if p.grad.is_sparse:
                    g = p.grad.coalesce()
                    rows, values = g.indices()[0], g.values()
                    m_rows = m[rows].mul_(b1).add_(values, alpha=1 - b1)
                    v_rows = v[rows].mul_(b2).addcmul_(values, values, value=1 - b2)
                    m[rows], v[rows] = m_rows, v_rows
                    w = p[rows].mul_(1 - lr * wd)
                    denom = (v_rows.sqrt() / math.sqrt(bc2)).add_(eps)
                    p[rows] = w.addcdiv_(m_rows, denom, value=-lr / bc1)
                else:
                    g = p.grad
                    p.mul_(1 - lr * wd)
                    m.lerp_(g, 1 - b1)
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
                    p.addcdiv_(m, denom, value=-lr / bc1)
        return loss


class WeightAverage:
    """An exponential moving average of a model's weights, updated after every optimizer
    step: ``avg <- d * avg + (1 - d) * w`` with ``d = min(decay, (1 + n) / (10 + n))`` at the
    n-th update (the warm-up keeps the first steps' random weights from lingering). Every
    rank holds the same weights after a step (averaged gradients), so every rank's average
    is the same; rank 0 validates it. Buffers are copied, not averaged.

    ``sparse``: names of parameters updated in rows (their gradient is sparse); call
    :meth:`before_step` after the gradients are reduced and before the optimizer step,
    :meth:`update` after it, and :meth:`sync` before reading ``model``."""

    def __init__(self, model: torch.nn.Module, decay: float, sparse: tuple[str, ...] = ()):
        if not 0 < decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.updates = 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.sparse = tuple(sparse)
        avg = dict(self.model.named_parameters())
        # per sparse parameter: the update count each row's average is current at
        self.current = {n: torch.zeros(avg[n].shape[0], dtype=torch.int64) for n in self.sparse}
        self.log_decay = torch.zeros(1024, dtype=torch.float64)  # [n]: sum of log d, updates 1..n
        self._rows: dict[str, torch.Tensor | None] = {}  # None: a dense gradient this step

    def _d(self, n: int) -> float:
        """The decay of the n-th update (0-based)."""
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def _catch_up(self, name: str, w: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Brings rows (all when None) of a sparse parameter's average to ``self.updates``,
        their weights ``w`` unchanged since the update each is current at."""
        avg = dict(self.model.named_parameters())[name]
        current = self.current[name]
        idx = torch.arange(len(current)) if rows is None else rows.cpu()
        since = current[idx]
        logs = self.log_decay
        kept = torch.exp(logs[self.updates] - logs[since]).to(avg.dtype).to(avg.device)  # P
        dev = idx.to(avg.device)
        a = avg[dev]
        avg[dev] = a + (1 - kept).unsqueeze(1) * (w[dev].detach() - a)
        current[idx] = self.updates

    @torch.no_grad()
    def before_step(self, model: torch.nn.Module) -> None:
        """Before the optimizer step: the rows the step will change, their average brought
        up to date with the weights they still hold."""
        params = dict(model.named_parameters())
        self._rows = {}
        for name in self.sparse:
            grad = params[name].grad
            if grad is None:
                continue
            if grad.is_sparse:  # coalesced once: the optimizer step reads the same rows
                grad = params[name].grad = grad.coalesce()
            rows = grad.indices()[0] if grad.is_sparse else None
            self._catch_up(name, params[name], rows)
            self._rows[name] = rows

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = self._d(self.updates)
        self._log(self.updates + 1, math.log(d))
        self.updates += 1
        params = dict(model.named_parameters())
        for name, avg in self.model.named_parameters():
            w = params[name].detach()
            if name not in self.sparse:
                avg.lerp_(w, 1 - d)
            elif name in self._rows and self._rows[name] is not None:
                rows = self._rows[name]
                avg[rows] = avg[rows].lerp_(w[rows], 1 - d)
                self.current[name][rows.cpu()] = self.updates
            elif name in self._rows:  # a dense gradient: every row moved
                avg.lerp_(w, 1 - d)
                self.current[name].fill_(self.updates)
            # no gradient this step: its rows wait, current where they were
        self._rows = {}
        for avg, b in zip(self.model.buffers(), model.buffers(), strict=True):
            avg.copy_(b)

    @torch.no_grad()
    def sync(self, model: torch.nn.Module) -> None:
        """Every row of every sparse parameter brought up to date (before the average is
        validated, saved or returned)."""
        params = dict(model.named_parameters())
        for name in self.sparse:
            self._catch_up(name, params[name], None)

    def _log(self, n: int, log_d: float) -> None:
        if n >= len(self.log_decay):
            grown = torch.zeros(2 * len(self.log_decay), dtype=torch.float64)
            grown[: len(self.log_decay)] = self.log_decay
            self.log_decay = grown
        self.log_decay[n] = self.log_decay[n - 1] + log_d

    def state_dict(self) -> dict[str, Any]:
        return {"weights": self.model.state_dict(), "updates": self.updates}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """A saved average is current in every row (saved after :meth:`sync`)."""
        self.model.load_state_dict(saved["weights"])
        self.updates = int(saved["updates"])
        for n in range(self.updates):
            self._log(n + 1, math.log(self._d(n)))
        for name in self.sparse:
            self.current[name].fill_(self.updates)
