"""Random sequences of public pool operations on three float64 LoRAMBoLinear layers (two
nn.Linear, one transformers Conv1D; different shapes, alphas, rsLoRA), trained by
lorambo.optim.AdamW, torch.optim.AdamW or torch.optim.SGD with momentum (one optimizer with
lora_A and lora_B in two parameter groups, or a list of one optimizer each), checked after every
operation against the independent float64 model of tests/pool_reference.py.

Rules: forward/backward on a random batch, optimizer step, zero_grad, set_rank (with and without
the optimizer), keep_components, keep_components_many, a rank move between two layers,
configure_model's re-ranking, reset_slot_state, save_adapter/load_adapter into a fresh model
with the optimizer's state_dict loaded into a fresh optimizer, the same through
model.state_dict() into layers built with other ranks and alphas (whole, and its lora_ keys
alone), an optimizer state_dict round
trip alone, a deep copy of model and optimizer, merge/unmerge, disable_adapter, freezing and
unfreezing pools.

Invariants: every layer's output on a fixed probe batch and the probe's gradients, the pools
(inactive slots exactly zero), their .grad, the optimizer's state, ranks, scalings and
requires_grad flags equal the reference; the pools are the same Parameter objects over the same
storage until a reload replaces the model.
"""

from __future__ import annotations

import copy
import io
import math
import tempfile

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, \
    run_state_machine_as_test
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.nn import keep_components_many

from pool_reference import RefLayer, RefOptimizer, RefPool, forward_all, gradients, loss_of

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

SHAPES = ((6, 5), (5, 7), (7, 4))  # (in, out) of l0, l1, l2 (Conv1D)
NAMES = ("l0", "l1", "l2")
CAPACITIES = (4, 5, 4)
TOL = dict(rtol=1e-9, atol=1e-10)  # float64 rounding, grown over up to 40 training steps
LR = {"lorambo_adamw": 1e-2, "torch_adamw": 1e-2, "sgd": 1e-2}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(6, 5)
        self.l1 = nn.Linear(5, 7, bias=False)
        self.l2 = Conv1D(4, 7)  # nf (out), nx (in)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(torch.tanh(self.l0(x)))))


def base_net(seed: int) -> Net:
    torch.manual_seed(seed)
    net = Net().double()
    with torch.no_grad():
        net.l2.weight.normal_(0, 0.3)  # Conv1D initialises at std 0.02: make its base count
        net.l2.bias.normal_(0, 0.3)
    return net


def layers_of(model):
    return [getattr(model, name) for name in NAMES]


class PoolMachine(RuleBasedStateMachine):
    @initialize(kind=st.sampled_from(["lorambo_adamw", "torch_adamw", "sgd"]),
                sgd_variant=st.sampled_from([(0.0, False), (0.3, False), (0.0, True)]),
                amsgrad=st.booleans(), weight_decay=st.sampled_from([0.0, 0.1]),
                backend=st.sampled_from(["auto", "torch"]), seed=st.integers(0, 2**16),
                ranks=st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 4)),
                lr_ratio=st.sampled_from([1.0, 4.0]), split=st.booleans())
    def build(self, kind, sgd_variant, amsgrad, weight_decay, backend, seed, ranks, lr_ratio, split):
        lorambo.set_backend(backend)
        self.tmp = tempfile.TemporaryDirectory()
        self.seed, self.kind, self.split = seed, kind, split
        self.opt_kwargs = dict(lr=LR[kind], weight_decay=weight_decay)
        if kind == "sgd":
            dampening, nesterov = sgd_variant
            self.opt_kwargs.update(momentum=0.9, dampening=dampening, nesterov=nesterov)
        else:
            self.opt_kwargs.update(betas=(0.9, 0.99), eps=1e-8, amsgrad=amsgrad)
        self.lr_B = LR[kind] * lr_ratio  # LoRA+: lora_B in a group of its own with a larger lr
        self.ref_opt = RefOptimizer(kind, **self.opt_kwargs, lr_B=self.lr_B)
        model = base_net(seed)
        model.l0 = LoRAMBoLinear(model.l0, rank=ranks[0], capacity=4, alpha=3.0, name="l0")
        model.l1 = LoRAMBoLinear(model.l1, rank=ranks[1], capacity=5, alpha=2.0, use_rslora=True, name="l1")
        model.l2 = LoRAMBoLinear(model.l2, rank=ranks[2], capacity=4, name="l2")
        gen = torch.Generator().manual_seed(seed + 1)
        self.ref = []
        for layer in layers_of(model):
            r = layer.rank
            with torch.no_grad():  # a trained-looking adapter: random active slots of A and B
                layer.lora_A[:r] = torch.randn(r, layer.in_features, generator=gen, dtype=torch.float64)
                layer.lora_B[:, :r] = torch.randn(layer.out_features, r, generator=gen, dtype=torch.float64) * 0.5
            self.ref.append(RefLayer(
                weight=layer.weight.detach().clone(),
                bias=None if layer.bias is None else layer.bias.detach().clone(),
                A=RefPool(layer.lora_A.detach().clone(), 0), B=RefPool(layer.lora_B.detach().clone(), 1),
                rank=r, scaling=layer.scaling))
        # scaling rule of the README: alpha / rank, alpha / sqrt(rank) with rsLoRA, alpha = rank by default
        expected = [3.0 / max(ranks[0], 1), 2.0 / math.sqrt(max(ranks[1], 1)), 1.0]
        for ref, s in zip(self.ref, expected):
            assert ref.scaling == pytest.approx(s, rel=1e-15)
        self.model = model
        self.opt = self.make_optimizer(model)
        self.probe = torch.randn(5, 6, generator=gen, dtype=torch.float64)
        self.probe_target = torch.randn(5, 4, generator=gen, dtype=torch.float64)
        self.remember_pools()

    def teardown(self):
        lorambo.set_backend(None)
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    # ----------------------------------------------------------------- helpers
    def make_optimizer(self, model):
        """One optimizer with lora_A and lora_B in two groups, or (split) a list of one optimizer
        per pool kind, which every rank change takes as its optimizer= (README, set_rank)."""
        cls = {"lorambo_adamw": lorambo.optim.AdamW, "torch_adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.kind]
        a_params = [layer.lora_A for layer in layers_of(model)]
        b_params = [layer.lora_B for layer in layers_of(model)]
        if self.split:
            return [cls(a_params, **self.opt_kwargs), cls(b_params, **{**self.opt_kwargs, "lr": self.lr_B})]
        return cls([{"params": a_params}, {"params": b_params, "lr": self.lr_B}], **self.opt_kwargs)

    def optimizers(self):
        return self.opt if isinstance(self.opt, list) else [self.opt]

    def optimizer_state(self):
        return [opt.state_dict() for opt in self.optimizers()]

    def load_optimizer_state(self, states):
        self.opt = self.make_optimizer(self.model)
        for opt, state in zip(self.optimizers(), states):
            opt.load_state_dict(state)

    def remember_pools(self):
        self.pool_ids = [(id(layer.lora_A), layer.lora_A.data_ptr(), id(layer.lora_B), layer.lora_B.data_ptr())
                         for layer in layers_of(self.model)]

    def sut_layers(self):
        return layers_of(self.model)

    def pools(self, i):
        layer, ref = self.sut_layers()[i], self.ref[i]
        return ((layer.lora_A, ref.A), (layer.lora_B, ref.B))

    def copy_new_rows(self, i, old):
        """Growth draws new rows of A (Kaiming-uniform, bound 1/sqrt(in)); the reference takes them."""
        layer, ref = self.sut_layers()[i], self.ref[i]
        new = layer.lora_A.detach()[old:layer.rank]
        if new.numel():
            assert new.abs().max() <= 1 / math.sqrt(layer.in_features) and new.abs().sum() > 0
        ref.A.value[old:layer.rank] = new

    def ref_set_rank(self, i, rank, with_optimizer):
        ref = self.ref[i]
        old = ref.rank
        lo, hi = min(old, rank), max(old, rank)
        for pool in ref.pools():
            if rank < old:
                pool.slots(pool.value, rank, old).zero_()
            else:
                pool.slots(pool.value, old, rank).zero_()  # B's new columns; A's rows copied after
            if pool.grad is not None:
                pool.slots(pool.grad, lo, hi).zero_()
        ref.rank = rank
        if with_optimizer and rank != old:
            self.ref_opt.reset_slots(ref, range(lo, hi), all_active_new=(old == 0))

    def ref_keep(self, i, keep, with_optimizer=True):
        ref = self.ref[i]
        old, n = ref.rank, len(keep)
        index = torch.tensor(keep, dtype=torch.long)
        for pool in ref.pools():
            for tensor in (pool.value, pool.grad):
                if tensor is not None:
                    kept = tensor.index_select(pool.slot_dim, index)
                    pool.slots(tensor, 0, n).copy_(kept)
                    pool.slots(tensor, n, old).zero_()
        ref.rank = n
        if with_optimizer:
            self.ref_opt.keep(ref, keep, old)

    def any_trains(self):
        return any(pool.trains for ref in self.ref for pool in ref.pools())

    def bounded(self):
        """No more training once a pool leaves [-100, 100]: SGD with momentum at scaling 7 (alpha 7,
        rank 1) and lr_ratio 4 diverges, and the model and its reference then compare NaN to NaN."""
        return all(pool.value.abs().max() <= 100 for ref in self.ref for pool in ref.pools())

    def unmerged(self):
        return not any(layer.merged for layer in self.sut_layers())

    # ------------------------------------------------------------------- rules
    @precondition(lambda self: self.any_trains() and self.bounded())
    @rule(seed=st.integers(0, 2**16))
    def backward(self, seed):
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn(4, 6, generator=gen, dtype=torch.float64)
        target = torch.randn(4, 4, generator=gen, dtype=torch.float64)
        loss_of(self.model(x), target).backward()
        for (i, name), grad in gradients(self.ref, x, target).items():
            pool = getattr(self.ref[i], name)
            pool.grad = grad if pool.grad is None else pool.grad + grad

    @rule()
    def step(self):
        for opt in self.optimizers():
            opt.step()
        for ref in self.ref:
            self.ref_opt.step(ref)

    @precondition(lambda self: self.any_trains() and self.bounded())
    @rule(seed=st.integers(0, 2**16))
    def train_step(self, seed):
        """The usual loop body (and so the usual rule): backward, step, zero_grad."""
        self.backward(seed)
        self.step()
        self.zero_grad(True)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=set_to_none)
        for ref in self.ref:
            for pool in ref.pools():
                if pool.grad is not None:
                    pool.grad = None if set_to_none else torch.zeros_like(pool.grad)

    @rule(i=st.integers(0, 2), data=st.data(), with_optimizer=st.sampled_from([True, True, True, False]))
    def set_rank(self, i, data, with_optimizer):
        layer = self.sut_layers()[i]
        rank = data.draw(st.integers(0, layer.capacity), label="rank")
        old = layer.set_rank(rank, optimizer=self.opt if with_optimizer else None)
        assert old == self.ref[i].rank
        self.ref_set_rank(i, rank, with_optimizer)
        self.copy_new_rows(i, old)

    @rule(i=st.integers(0, 2), data=st.data(), with_optimizer=st.sampled_from([True, True, True, False]))
    def keep_components(self, i, data, with_optimizer):
        rank = self.ref[i].rank
        keep = data.draw(st.permutations(range(rank)), label="order")[:data.draw(st.integers(0, rank), label="n")]
        assert self.sut_layers()[i].keep_components(keep, optimizer=self.opt if with_optimizer else None) == rank
        self.ref_keep(i, keep, with_optimizer)

    @rule(data=st.data())
    def keep_components_many(self, data):
        edits = []
        for i in data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True), label="layers"):
            rank = self.ref[i].rank
            keep = data.draw(st.permutations(range(rank)), label="order")[:data.draw(st.integers(0, rank), label="n")]
            edits.append((i, keep))
        keep_components_many([(self.sut_layers()[i], keep) for i, keep in edits], self.opt)
        for i, keep in edits:
            self.ref_keep(i, keep)

    @rule(src=st.integers(0, 2), dst=st.integers(0, 2), data=st.data())
    def move_rank(self, src, dst, data):
        """Drop the smallest-norm component of one layer and grow another by one (a budget move)."""
        layers = self.sut_layers()
        if src == dst or self.ref[src].rank == 0 or self.ref[dst].rank == layers[dst].capacity:
            return
        rank = self.ref[src].rank
        norms = [float(self.ref[src].B.value[:, s].norm() * self.ref[src].A.value[s].norm()) for s in range(rank)]
        keep = sorted(range(rank), key=lambda s: -norms[s])[:rank - 1]
        layers[src].keep_components(keep, optimizer=self.opt)
        self.ref_keep(src, keep)
        old = layers[dst].set_rank(self.ref[dst].rank + 1, optimizer=self.opt)
        self.ref_set_rank(dst, old + 1, True)
        self.copy_new_rows(dst, old)

    @rule(data=st.data())
    def configure_model(self, data):
        layers = self.sut_layers()
        ranks = {name: data.draw(st.integers(0, layer.capacity), label=name) for name, layer in zip(NAMES, layers)}
        olds = [layer.rank for layer in layers]
        lorambo.configure_model(self.model, ranks, optimizer=self.opt,
                                generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99))))
        for i, name in enumerate(NAMES):
            self.ref_set_rank(i, ranks[name], True)
            self.copy_new_rows(i, olds[i])

    @rule(i=st.integers(0, 2), data=st.data(), all_active_new=st.booleans())
    def reset_slot_state(self, i, data, all_active_new):
        slots = data.draw(st.lists(st.integers(0, CAPACITIES[i] - 1), unique=True), label="slots")
        lorambo.reset_slot_state(self.opt, self.sut_layers()[i], slots, all_active_new=all_active_new)
        self.ref_opt.reset_slots(self.ref[i], slots, all_active_new)

    @rule()
    def reload_optimizer(self):
        """The optimizer's state_dict (through torch.save) into a fresh optimizer on the same pools."""
        buffer = io.BytesIO()
        torch.save(self.optimizer_state(), buffer)
        buffer.seek(0)
        self.load_optimizer_state(torch.load(buffer, weights_only=True))

    @precondition(lambda self: self.unmerged())
    @rule()
    def reload_model_and_optimizer(self):
        """save_adapter, load_adapter into a fresh base model, and the optimizer's state into a
        fresh optimizer on the loaded pools (a resume in a new process)."""
        path = lorambo.save_adapter(self.model, f"{self.tmp.name}/adapter.safetensors")
        buffer = io.BytesIO()
        torch.save(self.optimizer_state(), buffer)
        buffer.seek(0)
        self.model = lorambo.load_adapter(base_net(self.seed), path)
        self.load_optimizer_state(torch.load(buffer, weights_only=True))
        self.remember_pools()
        all_frozen = not self.any_trains()
        for ref in self.ref:
            for pool in ref.pools():
                pool.grad = None  # a fresh model has no gradients
                pool.trains = pool.trains or all_frozen  # a model frozen whole is saved trainable

    @precondition(lambda self: self.unmerged())
    @rule(ranks=st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 4)))
    def reload_state_dict(self, ranks):
        """model.state_dict() (through torch.save) into a fresh model built with other ranks and
        alphas, and the optimizer's state into a fresh optimizer: the rank and scaling come back."""
        buffer = io.BytesIO()
        torch.save((self.model.state_dict(), self.optimizer_state()), buffer)
        buffer.seek(0)
        model_state, opt_state = torch.load(buffer, weights_only=True)
        model = base_net(self.seed)
        for name, rank, capacity in zip(NAMES, ranks, CAPACITIES):
            setattr(model, name, LoRAMBoLinear(getattr(model, name), rank=rank, capacity=capacity, alpha=7.0))
        model.load_state_dict(model_state)
        for layer, ref in zip(layers_of(model), self.ref):
            layer.lora_A.requires_grad_(ref.A.trains)
            layer.lora_B.requires_grad_(ref.B.trains)
        self.model = model
        self.load_optimizer_state(opt_state)
        self.remember_pools()
        for ref in self.ref:
            for pool in ref.pools():
                pool.grad = None

    @precondition(lambda self: self.unmerged())
    @rule(ranks=st.tuples(st.integers(0, 4), st.integers(0, 5), st.integers(0, 4)))
    def reload_lora_keys_only(self, ranks):
        """Only the lora_ keys of model.state_dict() (no extra state: a filtered state_dict) into a
        fresh model built with other ranks and alpha 7: each layer keeps its built scaling and
        raises its rank to cover the non-zero slots loaded (README, state_dict())."""
        model_state = {k: v for k, v in self.model.state_dict().items() if "lora_" in k}
        opt_state = self.optimizer_state()
        model = base_net(self.seed)
        for name, rank, capacity in zip(NAMES, ranks, CAPACITIES):
            setattr(model, name, LoRAMBoLinear(getattr(model, name), rank=rank, capacity=capacity, alpha=7.0))
        model.load_state_dict(model_state, strict=False)
        for layer, ref, built in zip(layers_of(model), self.ref, ranks):
            layer.lora_A.requires_grad_(ref.A.trains)
            layer.lora_B.requires_grad_(ref.B.trains)
            used = [s for s in range(layer.capacity) if ref.A.value[s].any() or ref.B.value[:, s].any()]
            ref.rank = max([built] + [s + 1 for s in used])
            ref.scaling = 7.0 / max(built, 1)
            for pool in ref.pools():
                pool.grad = None
        self.model = model
        self.load_optimizer_state(opt_state)
        self.remember_pools()

    @rule()
    def deepcopy_model_and_optimizer(self):
        """A deep copy of the model and its optimizer together carries on as the original."""
        self.model, self.opt = copy.deepcopy((self.model, self.opt))
        self.remember_pools()
        for ref in self.ref:
            for pool in ref.pools():
                pool.grad = None  # torch's Parameter.__deepcopy__ copies no .grad

    @precondition(lambda self: self.unmerged())
    @rule(exact=st.booleans(), i=st.integers(0, 2))
    def merge_unmerge(self, exact, i):
        layers = self.sut_layers()
        weights = [layer.weight.detach().clone() for layer in layers]
        for layer in layers:
            layer.merge(exact=exact)
        self.check_outputs()
        with pytest.raises(RuntimeError, match="unmerge"):
            layers[i].set_rank(0, optimizer=self.opt)
        for layer, weight in zip(layers, weights):
            layer.unmerge()
            if exact:
                assert torch.equal(layer.weight, weight)
            else:
                torch.testing.assert_close(layer.weight, weight, **TOL)

    @precondition(lambda self: self.unmerged())
    @rule()
    def disable_adapter(self):
        with torch.no_grad(), lorambo.disable_adapter(self.model):
            outs = [self.sut_layers()[0](self.probe)]
            for layer in self.sut_layers()[1:]:
                outs.append(layer(torch.tanh(outs[-1])))
        for out, expected in zip(outs, forward_all(self.ref, self.probe, use_adapter=False)):
            torch.testing.assert_close(out, expected, **TOL)

    @rule(i=st.integers(0, 2), which=st.sampled_from(["layer", "A", "B"]))
    def freeze(self, i, which):
        layer, ref = self.sut_layers()[i], self.ref[i]
        if which == "layer":
            layer.requires_grad_(False)
            ref.A.trains = ref.B.trains = False
        else:
            getattr(layer, f"lora_{which}").requires_grad_(False)
            getattr(ref, which).trains = False

    @rule(i=st.integers(0, 2), which=st.sampled_from(["A", "B"]))
    def unfreeze(self, i, which):
        getattr(self.sut_layers()[i], f"lora_{which}").requires_grad_(True)
        getattr(self.ref[i], which).trains = True

    # -------------------------------------------------------------- invariants
    def check_outputs(self):
        with torch.no_grad():
            outs, h = [], self.probe
            for layer in self.sut_layers():
                h = layer(h)
                outs.append(h)
                h = torch.tanh(h)
        for i, (out, expected) in enumerate(zip(outs, forward_all(self.ref, self.probe))):
            torch.testing.assert_close(out, expected, **TOL, msg=lambda m: f"layer {NAMES[i]} output: {m}")

    @invariant()
    def outputs_match(self):
        if hasattr(self, "ref"):
            self.check_outputs()

    @invariant()
    def probe_gradients_match(self):
        if not hasattr(self, "ref") or not self.any_trains():
            return
        pools = {(i, name): getattr(layer, f"lora_{name}") for i, layer in enumerate(self.sut_layers())
                 for name in ("A", "B")}
        expected = gradients(self.ref, self.probe, self.probe_target)
        got = torch.autograd.grad(loss_of(self.model(self.probe), self.probe_target), [pools[k] for k in expected])
        for key, grad in zip(expected, got):
            torch.testing.assert_close(grad, expected[key], **TOL, msg=lambda m: f"probe gradient {key}: {m}")

    @invariant()
    def pools_match(self):
        if not hasattr(self, "ref"):
            return
        for i, (layer, ref) in enumerate(zip(self.sut_layers(), self.ref)):
            assert layer.rank == ref.rank and layer.scaling == ref.scaling, NAMES[i]
            for (param, pool), name in zip(self.pools(i), ("A", "B")):
                label = f"{NAMES[i]}.lora_{name}"
                assert param.requires_grad == pool.trains, label
                torch.testing.assert_close(param.detach(), pool.value, **TOL, msg=lambda m: f"{label}: {m}")
                assert not pool.slots(param.detach(), ref.rank, layer.capacity).any(), f"{label}: inactive slot"
                assert (param.grad is None) == (pool.grad is None), f"{label}.grad: {param.grad} vs {pool.grad}"
                if pool.grad is not None:
                    torch.testing.assert_close(param.grad, pool.grad, **TOL, msg=lambda m: f"{label}.grad: {m}")

    @invariant()
    def same_parameter_objects(self):
        if hasattr(self, "ref"):
            now = [(id(layer.lora_A), layer.lora_A.data_ptr(), id(layer.lora_B), layer.lora_B.data_ptr())
                   for layer in self.sut_layers()]
            assert now == self.pool_ids

    @invariant()
    def optimizer_state_matches(self):
        if not hasattr(self, "ref"):
            return
        for i in range(3):
            for (param, pool), name in zip(self.pools(i), ("A", "B")):
                label = f"{NAMES[i]}.lora_{name} state"
                state = next((opt.state[param] for opt in self.optimizers() if param in opt.state), {})
                mine = pool.state
                if self.kind == "sgd":
                    pairs = [("momentum_buffer", "buf")]
                else:
                    pairs = [("exp_avg", "m"), ("exp_avg_sq", "v")]
                    if self.opt_kwargs["amsgrad"]:
                        pairs.append(("max_exp_avg_sq", "vmax"))
                    if self.kind == "lorambo_adamw":
                        pairs.append(("slot_step", "slot_step"))
                for theirs, ours in pairs:
                    got, expected = state.get(theirs), mine.get(ours)
                    if got is None or expected is None:  # no state yet is zero state (a rank-0 pool has none)
                        present = got if expected is None else expected
                        assert present is None or not present.any(), f"{label} {theirs}: {got} vs {expected}"
                        continue
                    torch.testing.assert_close(got.to(torch.float64), expected, **TOL,
                                               msg=lambda m: f"{label} {theirs}: {m}")
                if self.kind == "torch_adamw" and "step" in mine:
                    assert float(state["step"]) == mine["step"], f"{label} step {state['step']} vs {mine['step']}"


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_pool_matches_float64_reference():
    run_state_machine_as_test(PoolMachine, settings=settings(
        max_examples=150, stateful_step_count=40, deadline=None, derandomize=True, database=None))
