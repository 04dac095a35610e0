"""An independent float64 model of a stack of LoRAMBoLinear layers and their optimizer, written
from the README (*LoRAMBoLinear*, *lorambo.optim.AdamW*) and docs/architecture.md (the rank
pool), for tests/nn/test_pool_state_machine.py. It imports nothing of lorambo.

Each layer is dense A [capacity, in] and B [out, capacity] with an active rank r and a scaling
fixed at construction: y = x Wᵀ + b + s · (x A[:r]ᵀ) B[:, :r]ᵀ. The optimizers are written out
by hand: AdamW with one bias-correction count per slot (lorambo.optim.AdamW) or one per
parameter (torch.optim.AdamW), and SGD with momentum, whose slots made new with the optimizer
start their buffer as a fresh SGD does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

POOLS = (("A", 0), ("B", 1))  # pool name, slot dim


@dataclass
class RefPool:
    value: torch.Tensor
    slot_dim: int
    trains: bool = True
    grad: torch.Tensor | None = None
    state: dict = field(default_factory=dict)  # the optimizer's state of this pool

    def slots(self, tensor: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        return tensor.narrow(self.slot_dim, lo, hi - lo)


@dataclass
class RefLayer:
    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None
    A: RefPool
    B: RefPool
    rank: int
    scaling: float

    def pools(self):
        return (self.A, self.B)

    def forward(self, x, a=None, b=None):
        a = self.A.value if a is None else a
        b = self.B.value if b is None else b
        r = self.rank
        out = x @ self.weight.T + self.scaling * (x @ a[:r].T) @ b[:, :r].T
        return out if self.bias is None else out + self.bias

    def base_forward(self, x):
        out = x @ self.weight.T
        return out if self.bias is None else out + self.bias


def forward_all(layers, x, use_adapter=True):
    """Per-layer outputs of the stack (tanh between layers)."""
    outs, h = [], x
    for i, layer in enumerate(layers):
        h = layer.forward(h) if use_adapter else layer.base_forward(h)
        outs.append(h)
        if i + 1 < len(layers):
            h = torch.tanh(h)
    return outs


def loss_of(out, target):
    return 0.5 * ((out - target) ** 2).sum()


def gradients(layers, x, target):
    """{(layer index, pool name): d loss / d pool} for the pools that train (torch autograd on
    the dense formula above)."""
    leaves, h = {}, x
    for i, layer in enumerate(layers):
        a = layer.A.value.clone().requires_grad_(layer.A.trains)
        b = layer.B.value.clone().requires_grad_(layer.B.trains)
        leaves[(i, "A")], leaves[(i, "B")] = a, b
        h = layer.forward(h, a, b)
        if i + 1 < len(layers):
            h = torch.tanh(h)
    trained = {key: leaf for key, leaf in leaves.items() if leaf.requires_grad}
    grads = torch.autograd.grad(loss_of(h, target), list(trained.values()))
    return dict(zip(trained, grads))


class RefOptimizer:
    """kind: 'lorambo_adamw', 'torch_adamw' or 'sgd'."""

    def __init__(self, kind, lr, weight_decay, betas=(0.9, 0.99), eps=1e-8, amsgrad=False,
                 momentum=0.9, dampening=0.0, nesterov=False, lr_B=None):
        self.kind, self.wd = kind, weight_decay
        self.lrs = (lr, lr if lr_B is None else lr_B)  # of A and of B (two parameter groups)
        self.betas, self.eps, self.amsgrad = betas, eps, amsgrad
        self.momentum, self.dampening, self.nesterov = momentum, dampening, nesterov

    # ------------------------------------------------------------------ steps
    def step(self, layer: RefLayer) -> None:
        for pool in layer.pools():
            if pool.grad is not None:
                self.lr = self.lrs[pool.slot_dim]
                getattr(self, f"_step_{self.kind}")(pool, layer.rank)
            # after every step the inactive slots of a stepped pool are exactly zero
            pool.slots(pool.value, layer.rank, pool.value.shape[pool.slot_dim]).zero_()

    def _moments(self, pool):
        if "m" not in pool.state:
            pool.state["m"] = torch.zeros_like(pool.value)
            pool.state["v"] = torch.zeros_like(pool.value)
            pool.state["vmax"] = torch.zeros_like(pool.value)
        return pool.state

    def _adam(self, p, g, m, v, vmax, t):
        """One AdamW update of views p, m, v, vmax with bias-correction counts t (broadcast)."""
        b1, b2 = self.betas
        p.mul_(1 - self.lr * self.wd)
        m.mul_(b1).add_((1 - b1) * g)
        v.mul_(b2).add_((1 - b2) * g * g)
        second = v
        if self.amsgrad:
            vmax.copy_(torch.maximum(vmax, v))
            second = vmax
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        p.sub_(self.lr / bc1 * m / (second.sqrt() / bc2.sqrt() + self.eps))

    def _step_lorambo_adamw(self, pool, rank):
        state = self._moments(pool)
        capacity = pool.value.shape[pool.slot_dim]
        steps = state.setdefault("slot_step", torch.zeros(capacity, dtype=torch.float64))
        steps[:rank] += 1  # only active slots are read and written
        shape = [1, 1]
        shape[pool.slot_dim] = rank
        t = steps[:rank].reshape(shape)
        views = [pool.slots(x, 0, rank) for x in (pool.value, pool.grad, state["m"], state["v"], state["vmax"])]
        self._adam(*views, t)

    def _step_torch_adamw(self, pool, rank):
        state = self._moments(pool)
        state["step"] = state.get("step", 0) + 1
        t = torch.tensor(float(state["step"]), dtype=torch.float64)
        self._adam(pool.value, pool.grad, state["m"], state["v"], state["vmax"], t)

    def _step_sgd(self, pool, rank):
        state = pool.state
        capacity = pool.value.shape[pool.slot_dim]
        d = pool.grad + self.wd * pool.value
        fresh = state.setdefault("fresh", torch.zeros(capacity, dtype=torch.bool))
        if "buf" not in state:
            state["buf"] = d.clone()
        else:
            shape = [1, 1]
            shape[pool.slot_dim] = capacity
            old = self.momentum * state["buf"] + (1 - self.dampening) * d
            state["buf"] = torch.where(fresh.reshape(shape), d, old)  # a fresh SGD's start
        fresh.zero_()
        step = d + self.momentum * state["buf"] if self.nesterov else state["buf"]
        pool.value.sub_(self.lr * step)

    # -------------------------------------------------------- slot edits (optimizer passed)
    def reset_slots(self, layer: RefLayer, slots, all_active_new: bool) -> None:
        """The slots get a fresh optimizer's state; all_active_new also restarts a shared step."""
        slots = list(slots)
        if not slots:
            return
        index = torch.tensor(slots)
        for pool in layer.pools():
            state = pool.state
            for key in ("m", "v", "vmax", "buf", "slot_step"):
                if key in state:
                    dim = 0 if key == "slot_step" else pool.slot_dim
                    state[key].index_fill_(dim, index, 0)
            if self.kind == "sgd" and "buf" in state and self.dampening:
                state["fresh"][index] = True
            if all_active_new and "step" in state:
                state["step"] = 0

    def keep(self, layer: RefLayer, keep, old_rank: int) -> None:
        """Kept slots' state moves to the front, the rest of the old active slots are zeroed; so
        does SGD's record of slots waiting for their first step (zeroed: not waiting)."""
        n, index = len(keep), torch.tensor(keep, dtype=torch.long)
        for pool in layer.pools():
            for key in ("m", "v", "vmax", "buf", "slot_step", "fresh"):
                if key in pool.state:
                    dim = 0 if key in ("slot_step", "fresh") else pool.slot_dim
                    value = pool.state[key]
                    kept = value.index_select(dim, index)
                    value.narrow(dim, 0, n).copy_(kept)
                    value.narrow(dim, n, old_rank - n).zero_()
