"""Random sequences of training steps under a LoRAMBoOptimizer (online growth, rank moves, ALoRA
or no online decisions; thresholds, budgets and rank bounds drawn) on a float64 model of four
LoRAMBoLinear layers of different shapes and a ``modules_to_save`` head, one layer's lora_B
optionally frozen, trained by make_optimizer's AdamW or torch's SGD with momentum (passed as
``optimizer=``), checked after every rule against docs/allocation.md.

Two runs are driven with the same rules from the same start: ``main`` and ``shadow``. ``main``
is checkpointed as "Checkpoints and resume" shows (``save_adapter`` + ``opt.state_dict()``),
trained on past the checkpoint (steps that are then lost) and resumed into a fresh base model
and allocator, or it fails an attempt at a step and retries it; ``shadow`` never stops. The two
must stay equal bit for bit: parameters, ranks, optimizer state, the allocation and the
decision records.

Rules: 1-3 training steps (each of 1-3 micro-batches of random size under one ``capture``, or
with ``opt.step`` after every micro-batch as a plain loop may; zero_grad with or without
set_to_none); a checkpoint + resume of ``main`` (0-2 lost steps; the model rebuilt by
``load_adapter`` or from its ``state_dict``, or a deep copy taken at the checkpoint); an attempt
at a step that raises after its forward or backward (the ``capture`` block, or ``begin_step`` +
``close``) and is retried; a re-allocation (``compute_optimal_ranks`` + ``configure`` on the
trained adapters); a new allocator with other budgets on the trained model (a new phase, the
same ``log_path``); ``restart_steps`` (a second loop from step 0).

Invariants: ``Σ r (d + k)`` within ``total_budget`` (and ``initial_budget`` right after an
allocation), every rank within [min_rank, max_rank] and its capacity (an allocation's
``min_rank`` may not fit capacity), ALoRA's rank sum conserved, inactive slots of the pools,
their gradients and the optimizer's moments exactly zero, the model's output equal to a float64
recomputation from the base weights and the active pool slices, scalings fixed, decision records
replaying to the observed rank changes with ``spent`` as logged, ``read_decisions(log_path)``
equal to ``opt.decisions``, and no warning but the documented repeat-step one.
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from copy import deepcopy
from pathlib import Path

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule, run_state_machine_as_test
from torch import nn

import lorambo
from lorambo import LoRAMBoOptimizer
from lorambo.allocation.report import read_decisions

NAMES = ("l0", "l1", "l2", "l3")
SHAPES = {"l0": (6, 5, True), "l1": (5, 7, False), "l2": (7, 6, True), "l3": (6, 4, True)}  # in, out, bias
COSTS = {n: i + o for n, (i, o, _) in SHAPES.items()}
BUDGETS = ((60, 120), (90, 233), (120, 150), (46, 200))  # (initial_budget, total_budget)
ALLOWED_WARNINGS = (r"step \d+ has changed ranks already",)  # docs/allocation.md, gradient accumulation


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        for name, (i, o, bias) in SHAPES.items():
            setattr(self, name, nn.Linear(i, o, bias=bias))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = x
        for name in NAMES:
            h = torch.tanh(getattr(self, name)(h))
        return self.head(h)


def base_net(seed: int) -> Net:
    torch.manual_seed(seed)
    return Net().double()


def mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def batch_of(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(2, 7, (), generator=g))
    return torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def reference_output(weights, model, scalings, x):
    """x through the stack, from the base weights kept at the start and the active pool slices:
    x Wᵀ + b + s (x A_rᵀ) B_rᵀ per layer, tanh between, then the head."""
    h = x
    for name in NAMES:
        layer = getattr(model, name)
        w, b = weights[name]
        r = layer.rank
        a, bb = layer.lora_A.detach()[:r], layer.lora_B.detach()[:, :r]
        out = h @ w.T + scalings[name] * (h @ a.T) @ bb.T
        h = torch.tanh(out if b is None else out + b)
    return h @ model.head.weight.detach().T + model.head.bias.detach()


class Run:
    """One training run: model, allocator, lorambo.optim.AdamW, and its decision log."""

    def __init__(self, model, opt, torch_opt, log):
        self.model, self.opt, self.torch_opt, self.log = model, opt, torch_opt, log


class AllocatorMachine(RuleBasedStateMachine):
    @initialize(mode=st.sampled_from(["growth", "moves", "alora", "none"]),
                sensitivity=st.sampled_from(["gradient", "data", "frobenius"]),
                budgets=st.sampled_from(BUDGETS),
                min_rank=st.sampled_from([0, 0, 1]), max_rank=st.sampled_from([None, 3, 4]),
                threshold=st.sampled_from([0.0, 0.0, 0.0, 1e-3, 0.05, math.inf]),
                move_threshold=st.sampled_from([1e3, 1e-2, 0.0]),
                warmup=st.integers(0, 2), interval=st.integers(1, 3), stop_step=st.sampled_from([None, 5, 8]),
                sketch_rank=st.integers(1, 2), power_iters=st.integers(0, 2), max_tokens=st.sampled_from([None, 3]),
                alora_rounds=st.integers(1, 3), n_prune=st.integers(1, 2), frozen_b=st.booleans(),
                alpha=st.sampled_from([None, 2.0]), capacity=st.sampled_from([None, None, 3, {"l0": 2, "l2": 6}]),
                sgd=st.booleans(),
                weight_decay=st.sampled_from([0.0, 0.1]),
                seed=st.integers(0, 2**16))
    def build(self, mode, sensitivity, budgets, min_rank, max_rank, threshold, move_threshold, warmup, interval,
              stop_step, sketch_rank, power_iters, max_tokens, alora_rounds, n_prune, frozen_b, alpha,
              capacity, sgd, weight_decay, seed):
        self.min_rank, self.max_rank = min_rank, max_rank
        initial, total = self.fitting(budgets)
        self.earlier_records = {}
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = Path(self.tmp.name)
        self.seed, self.mode, self.frozen_b = seed, mode, frozen_b
        self.heldout = [batch_of(seed + 7)]
        self.kwargs = dict(total_budget=total, initial_budget=initial, sensitivity_method=sensitivity,
                           target_modules=list(NAMES), modules_to_save=["head"], min_rank=min_rank,
                           max_rank=max_rank, seed=seed % 5, alpha=alpha, loss_improvement_threshold=threshold,
                           sketch_rank=sketch_rank, power_iters=power_iters, max_tokens=max_tokens,
                           heldout_batches=self.heldout, loss_fn=mse, capacity=capacity)
        if mode == "alora":
            self.kwargs.update(allocation="alora",
                               alora=dict(k1=warmup, k2=interval, rounds=alora_rounds, n_prune=n_prune))
        elif mode != "none":
            self.kwargs.update(warmup_steps=warmup, interval=interval, stop_step=stop_step)
            if mode == "moves":
                self.kwargs.update(move_threshold=move_threshold, max_moves=2)
        self.sgd = sgd
        self.optimizer_kwargs = dict(lr=2e-2, weight_decay=weight_decay)
        base = base_net(seed)
        self.weights = {n: (getattr(base, n).weight.detach().clone(),
                            None if getattr(base, n).bias is None else getattr(base, n).bias.detach().clone())
                        for n in NAMES}
        self.batches = [batch_of(seed + 1), batch_of(seed + 2)]
        self.main = self.new_run("main.jsonl")
        self.shadow = self.new_run("shadow.jsonl")
        self.scalings = {n: getattr(self.main.model, n).scaling for n in NAMES}
        self.step_no = 0
        self.rank_sum = sum(self.main.opt.current_ranks().values())  # ALoRA conserves it
        self.check_allocation(self.main)
        self.probe = batch_of(seed + 3)[0]

    def teardown(self):
        if hasattr(self, "tmp"):
            self.tmp.cleanup()

    # ----------------------------------------------------------------- helpers
    def fitting(self, budgets):
        """(initial, total) with initial_budget raised to what min_rank takes in every layer."""
        initial, total = budgets
        return max(initial, self.min_rank * sum(COSTS.values())), total

    def new_run(self, log_name: str) -> Run:
        model = base_net(self.seed)
        with self.allowed_warnings():
            opt = LoRAMBoOptimizer(model, log_path=self.dir / log_name, **self.kwargs)
            opt.compute_optimal_ranks(self.batches, mse)
            opt.configure()
        if self.frozen_b:
            model.l1.lora_B.requires_grad_(False)  # a layer left out of online decisions
        return Run(model, opt, self.torch_optimizer(opt, model), self.dir / log_name)

    def torch_optimizer(self, opt, model):
        """make_optimizer's lorambo.optim.AdamW, or torch's SGD with momentum, which every rank
        change must then be given (docs/allocation.md)."""
        if not self.sgd:
            return opt.make_optimizer(**self.optimizer_kwargs)
        params = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(params, momentum=0.9, **self.optimizer_kwargs)

    def passed(self, run):
        return run.torch_opt if self.sgd else None  # None: make_optimizer's, the default

    def runs(self):
        return (self.main, self.shadow)

    def allowed_warnings(self):
        machine = self

        class Checked(warnings.catch_warnings):
            def __enter__(self):
                self.caught = super().__enter__()
                warnings.simplefilter("always")
                return self.caught

            def __exit__(self, *exc):
                super().__exit__(*exc)
                if exc[0] is None:
                    machine.check_warnings(self.caught)

        return Checked(record=True)

    @staticmethod
    def check_warnings(caught):
        for w in caught:
            assert any(re.search(p, str(w.message)) for p in ALLOWED_WARNINGS), \
                f"undocumented warning {w.category.__name__}: {w.message}"

    def check_allocation(self, run):
        spent = sum(COSTS[n] * r for n, r in run.opt.ranks.items())
        assert spent <= run.opt.initial_budget, (run.opt.ranks, run.opt.initial_budget)
        assert run.opt.current_ranks() == run.opt.ranks

    def train(self, run, seeds, every_micro: bool, set_to_none: bool, step: int):
        """One training step of ``run``; returns (ranks before, records, ranks after)."""
        opt = run.opt
        before = opt.current_ranks()
        calls = []
        with self.allowed_warnings():
            for i, s in enumerate(seeds):
                with opt.capture(step, batch_of(s)):
                    (mse(run.model, batch_of(s)) / len(seeds)).backward()
                if every_micro and i + 1 < len(seeds):
                    calls.append(opt.step(step, optimizer=self.passed(run)))
            calls.append(opt.step(step, optimizer=self.passed(run)))
            run.torch_opt.step()
            run.torch_opt.zero_grad(set_to_none=set_to_none)
        # a call whose decision changed ranks is the step's last that takes one (docs/allocation.md)
        changed = [i for i, got in enumerate(calls) if got]
        assert len(changed) <= 1, calls
        return before, [r for got in calls for r in got], opt.current_ranks()

    def check_records(self, run, before, records, after, step):
        """The records replay the rank change; ``spent`` is Σ r (d + k) right after its change."""
        opt = run.opt
        if records:
            assert opt.is_decision_step(step), (step, records)
        ranks = dict(before)
        for rec in records:
            assert rec["step"] == step
            assert rec["old_rank"] == ranks[rec["layer"]], (rec, ranks)
            ranks[rec["layer"]] = rec["new_rank"]
            if rec["event"] == "grow":
                assert rec["new_rank"] > rec["old_rank"]
            else:
                assert rec["event"] == "shrink"
                assert rec["new_rank"] == rec["old_rank"] - len(rec["components"]) >= 0
                assert len(rec["scores"]) == len(rec["components"])
            if "spent" in rec:
                assert rec["budget"] == opt.total_budget
                assert rec["spent"] == sum(COSTS[n] * r for n, r in ranks.items()), (rec, ranks)
            if self.frozen_b:
                assert rec["layer"] != "l1", rec
        assert ranks == after, (records, before, after)

    # ------------------------------------------------------------------- rules
    @rule(steps=st.lists(st.lists(st.integers(0, 2**16), min_size=1, max_size=3), min_size=1, max_size=3),
          every_micro=st.booleans(), set_to_none=st.booleans())
    def train_steps(self, steps, every_micro, set_to_none):
        """1-3 training steps of 1-3 micro-batches each, in both runs."""
        for seeds in steps:
            step = self.step_no
            results = [self.train(run, seeds, every_micro, set_to_none, step) for run in self.runs()]
            for run, (before, records, after) in zip(self.runs(), results):
                self.check_records(run, before, records, after, step)
            assert results[0][1] == results[1][1]
            self.step_no += 1

    @rule(seeds=st.lists(st.integers(0, 2**16), min_size=1, max_size=2), block=st.booleans(),
          after_backward=st.booleans())
    def failed_attempt_then_retry(self, seeds, block, after_backward):
        """main: an attempt at the step fails (out of memory, say) after its forward or backward
        and is retried, as docs/allocation.md says (the capture block, or begin_step + close);
        shadow: the step without a failure. Both must go on alike."""
        step, run = self.step_no, self.main
        with self.allowed_warnings():
            for s in seeds:
                try:
                    if block:
                        with run.opt.capture(step, batch_of(s)):
                            loss = mse(run.model, batch_of(s))
                            if after_backward:
                                loss.backward()
                            raise MemoryError("simulated")
                    else:
                        run.opt.begin_step(step, batch_of(s))
                        loss = mse(run.model, batch_of(s))
                        if after_backward:
                            loss.backward()
                        raise MemoryError("simulated")
                except MemoryError:
                    if not block:
                        run.opt.close()
                    run.torch_opt.zero_grad()
        results = [self.train(r, seeds, False, True, step) for r in self.runs()]
        for r, (before, records, after) in zip(self.runs(), results):
            self.check_records(r, before, records, after, step)
        self.step_no += 1

    @rule()
    def restart_steps(self):
        """A second training loop on the same allocators, its step numbers from 0 again."""
        for run in self.runs():
            run.opt.restart_steps()
        self.step_no = 0

    @rule(lost=st.lists(st.integers(0, 2**16), max_size=2),
          rebuild=st.sampled_from(["adapter", "state_dict", "deepcopy"]))
    def checkpoint_and_resume(self, lost, rebuild):
        """main: checkpoint, train on (steps then lost), resume into fresh objects: the model by
        load_adapter, or configure_model with the saved capacities and the model's state_dict. Or
        main goes on as a deep copy of itself (no lost steps: a copy does not rewrite the log)."""
        run = self.main
        if rebuild == "deepcopy":
            self.main = Run(*deepcopy((run.model, run.opt, run.torch_opt)), run.log)
            return
        ckpt = self.dir / "ckpt"
        with self.allowed_warnings():
            lorambo.save_adapter(run.model, ckpt)
            torch.save({"lorambo": run.opt.state_dict(), "model": run.model.state_dict(),
                        "optimizer": run.torch_opt.state_dict()}, ckpt / "state.pt")
        capacities = {n: layer.capacity for n, layer in lorambo.lora_layers(run.model).items()}
        for i, s in enumerate(lost):
            self.train(run, [s], False, True, self.step_no + i)
        state = torch.load(ckpt / "state.pt", weights_only=True)
        with self.allowed_warnings():
            if rebuild == "adapter":
                model = lorambo.load_adapter(base_net(self.seed), ckpt)
            else:
                model = lorambo.configure_model(base_net(self.seed), 1, target_modules=list(NAMES),
                                                capacity=capacities, modules_to_save=["head"])
                model.load_state_dict(state["model"])
                model.l1.lora_B.requires_grad_(not self.frozen_b)  # a state_dict holds no flags
            opt = LoRAMBoOptimizer(model, log_path=run.log, **self.kwargs)
            torch_opt = self.torch_optimizer(opt, model)
            if self.sgd:  # opt.state_dict() holds make_optimizer's only
                torch_opt.load_state_dict(state["optimizer"])
            opt.load_state_dict(state["lorambo"])
        assert opt.current_ranks() == {n: layer.rank for n, layer in lorambo.lora_layers(model).items()}
        self.main = Run(model, opt, torch_opt, run.log)

    @rule()
    def reallocate(self):
        """compute_optimal_ranks + configure on the trained adapters (capacities are fixed now)."""
        for run in self.runs():
            frozen_rank = run.model.l1.rank
            with self.allowed_warnings():
                run.opt.compute_optimal_ranks(self.batches, mse)
                run.opt.configure(optimizer=self.passed(run))
            self.check_allocation(run)
            if self.frozen_b:  # a layer whose lora_B is frozen keeps its rank
                assert run.model.l1.rank == frozen_rank
        self.rank_sum = sum(self.main.opt.current_ranks().values())

    @rule(budgets=st.sampled_from(BUDGETS))
    def new_allocator_with_another_budget(self, budgets):
        """A new phase: a new allocator with other budgets on the trained model (capacities now
        fixed), re-allocated and configured, with a fresh optimizer, on the same log_path."""
        initial, total = self.fitting(budgets)
        frozen = self.frozen_b and self.main.model.l1.rank * COSTS["l1"] + self.min_rank * (
            sum(COSTS.values()) - COSTS["l1"]) > initial
        self.kwargs.update(total_budget=total, initial_budget=initial)
        for run in self.runs():
            if frozen:  # documented: the frozen layers' ranks alone exceed initial_budget
                opt = LoRAMBoOptimizer(run.model, log_path=run.log, **self.kwargs)
                with pytest.raises(ValueError, match="frozen"):
                    opt.compute_optimal_ranks(self.batches, mse)
                self.kwargs.update(total_budget=run.opt.total_budget, initial_budget=run.opt.initial_budget)
                return
            if run.opt.decisions:  # else the file keeps what an allocator before it wrote
                self.earlier_records[run.log] = run.opt.decisions
            with self.allowed_warnings():
                opt = LoRAMBoOptimizer(run.model, log_path=run.log, **self.kwargs)
                opt.compute_optimal_ranks(self.batches, mse)
                opt.configure(optimizer=run.torch_opt)  # the old phase's optimizer, replaced below
            run.opt, run.torch_opt = opt, self.torch_optimizer(opt, run.model)
            self.check_allocation(run)
        self.rank_sum = sum(self.main.opt.current_ranks().values())

    # -------------------------------------------------------------- invariants
    @invariant()
    def budget_and_rank_bounds(self):
        if not hasattr(self, "main"):
            return
        for run in self.runs():
            layers = lorambo.lora_layers(run.model)
            assert list(layers) == list(NAMES)
            spent = sum(COSTS[n] * layer.rank for n, layer in layers.items())
            assert spent <= run.opt.total_budget, (spent, run.opt.total_budget)
            for n, layer in layers.items():
                assert self.min_rank <= layer.rank <= layer.capacity, (n, layer.rank, layer.capacity)
                if self.max_rank is not None:
                    assert layer.rank <= self.max_rank, (n, layer.rank)
                assert layer.capacity <= min(SHAPES[n][:2])
            if self.mode == "alora":
                assert sum(layer.rank for layer in layers.values()) == self.rank_sum

    @invariant()
    def inactive_slots_zero(self):
        if not hasattr(self, "main"):
            return
        for run in self.runs():
            for n, layer in lorambo.lora_layers(run.model).items():
                r = layer.rank
                for label, pool, inactive in (("lora_A", layer.lora_A, lambda t: t[r:]),
                                              ("lora_B", layer.lora_B, lambda t: t[:, r:])):
                    assert not inactive(pool.detach()).any(), f"{n}.{label}: inactive slot"
                    if pool.grad is not None:
                        assert not inactive(pool.grad).any(), f"{n}.{label}.grad: inactive slot"
                    state = run.torch_opt.state.get(pool, {})
                    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer"):
                        if key in state:
                            assert not inactive(state[key]).any(), f"{n}.{label} {key}: inactive slot"
                assert layer.scaling == self.scalings[n], n
                assert layer.lora_B.requires_grad == (not (self.frozen_b and n == "l1")), n

    @invariant()
    def output_is_the_float64_recomputation(self):
        if not hasattr(self, "main"):
            return
        for run in self.runs():
            with torch.no_grad():
                got = run.model(self.probe)
            want = reference_output(self.weights, run.model, self.scalings, self.probe)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    @invariant()
    def decision_log_is_the_decisions(self):
        if not hasattr(self, "main"):
            return
        for run in self.runs():
            logged = read_decisions(run.log) if run.log.exists() else []
            if not run.opt.decisions:  # the run's first decision replaces an earlier run's records
                assert logged in ([], self.earlier_records.get(run.log, [])), logged
            else:
                assert logged == run.opt.decisions, (run.log.name, logged, run.opt.decisions)

    @invariant()
    def resumed_run_is_the_uninterrupted_one(self):
        if not hasattr(self, "main"):
            return
        a, b = self.main, self.shadow
        assert a.opt.decisions == b.opt.decisions
        assert a.opt.current_ranks() == b.opt.current_ranks()
        assert (a.opt.ranks, a.opt.capacities, a.opt.sensitivities) == (b.opt.ranks, b.opt.capacities,
                                                                        b.opt.sensitivities)
        sa, sb = a.model.state_dict(), b.model.state_dict()
        assert sa.keys() == sb.keys()
        for k, v in sb.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(sa[k], v), k
        assert [p.requires_grad for p in a.model.parameters()] == [p.requires_grad for p in b.model.parameters()]
        oa, ob = a.torch_opt.state_dict(), b.torch_opt.state_dict()
        assert oa["param_groups"] == ob["param_groups"]
        assert oa["state"].keys() == ob["state"].keys()
        for i, s in ob["state"].items():
            assert s.keys() == oa["state"][i].keys(), i
            for key, v in s.items():
                assert torch.equal(torch.as_tensor(oa["state"][i][key]), torch.as_tensor(v)), (i, key)


@pytest.mark.usefixtures("one_thread")
def test_allocator_runs_keep_their_invariants_and_resume_bit_for_bit():
    run_state_machine_as_test(AllocatorMachine, settings=settings(
        max_examples=100, stateful_step_count=25, deadline=None, derandomize=True, database=None))
