"""A synthetic multi-task merging benchmark small enough for CI (seeded, ~2-3 s on one idle thread).

Shared inputs ``x ∈ R^16``; ``K`` regression tasks, task ``k`` reads head ``k`` of
a shared-body MLP (16 → 32 → K, tanh) and its target is its own random
nonlinear function of ``x``.  The base model is pretrained briefly (20 Adam
steps) on all tasks jointly (a weak "foundation" that knows a little of each
task); each task is then fine-tuned alone from the base (100 steps), so its task vector moves the
shared body and its own head.  Merging the K fine-tuned models into one and
evaluating every head measures interference between task vectors -- the
setting of TIES (Yadav et al. 2023, §6) and CABS (Yang et al. 2025) at toy scale.

``build()`` returns a :class:`MultiTask` with ``base`` and ``finetuned`` state
dicts and ``evaluate(state) -> per-task normalized MSE`` (1.0 = predicting the
mean; lower is better) on held-out inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

IN = 16


def _model(k: int, hidden: int) -> nn.Module:
    return nn.Sequential(nn.Linear(IN, hidden), nn.Tanh(), nn.Linear(hidden, k))


@dataclass
class MultiTask:
    model: nn.Module
    base: dict
    finetuned: list
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor

    @property
    def num_tasks(self) -> int:
        return self.y_test.shape[1]

    @torch.no_grad()
    def evaluate(self, state: dict, split: str = "test") -> torch.Tensor:
        """Per-task held-out MSE divided by the target's variance, shape ``(K,)``; ``split`` "test" or "val"."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_val, self.y_val)
        self.model.load_state_dict(state)
        return ((self.model(x) - y) ** 2).mean(0) / y.var(0)


def _targets(x: torch.Tensor, proj: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    # task k: y_k = Σ_j mix[k, j]·tanh(x·proj[k, :, j])  (a random 2-layer teacher per task)
    return (torch.tanh(torch.einsum("ni,kij->nkj", x, proj)) * mix[None]).sum(-1)


def _train(model, x, y, heads, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x)[:, heads] - y[:, heads]) ** 2).mean()
        loss.backward()
        opt.step()


def build(num_tasks: int = 4, seed: int = 0, n_train: int = 256, pre_steps: int = 20, ft_steps: int = 100,
          lr: float = 1e-3, hidden: int = 32) -> MultiTask:
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(num_tasks, IN, 4, generator=g) / IN ** 0.5
    mix = torch.randn(num_tasks, 4, generator=g)
    x = torch.randn(n_train, IN, generator=g)
    x_test = torch.randn(1024, IN, generator=g)
    x_val = torch.randn(256, IN, generator=g)
    y, y_test, y_val = _targets(x, proj, mix), _targets(x_test, proj, mix), _targets(x_val, proj, mix)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = _model(num_tasks, hidden)
        _train(model, x, y, list(range(num_tasks)), pre_steps, lr)
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        finetuned = []
        for k in range(num_tasks):
            model.load_state_dict(base)
            _train(model, x, y, [k], ft_steps, lr)
            finetuned.append({n: v.detach().clone() for n, v in model.state_dict().items()})
    return MultiTask(model, base, finetuned, x_test, y_test, x_val, y_val)
