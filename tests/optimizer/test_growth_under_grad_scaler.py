"""Online growth under a GradScaler: the captured dY carry the loss scale, and ``grad_scaler=``
makes the gains (and so every threshold decision) those of the unscaled loss."""

import pytest
import torch
from torch import nn

from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64
SCALE = 2.0 ** 10

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.Tanh(), nn.Linear(16, 8, dtype=DT),
                         nn.Tanh(), nn.Linear(8, 3, dtype=DT))


def _decide(threshold, loss_scale=1.0, grad_scaler=None):
    """One decision step of a seeded run; the backward runs on loss * loss_scale."""
    model = _model()
    opt = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                           capacity=8, interval=1, sketch_rank=4, loss_improvement_threshold=threshold)
    opt.configure({"0": 1, "2": 1})
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
    with opt.capture(0):
        (((model(x) - y) ** 2).mean() * loss_scale).backward()
    return [(r["layer"], r["new_rank"], r["gains"]) for r in opt.step(0, grad_scaler=grad_scaler)]


def test_scaled_backward_with_the_scaler_decides_as_the_unscaled_one():
    gains = sorted(g for _, _, gs in _decide(0.0) for g in gs)
    assert len(gains) >= 4
    threshold = (gains[0] + gains[-1]) / 2        # some ranks pass it, some do not
    plain = _decide(threshold)
    assert 0 < sum(len(gs) for _, _, gs in plain) < len(gains)
    scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
    scaled = _decide(threshold, SCALE, scaler)
    assert [(n, r) for n, r, _ in scaled] == [(n, r) for n, r, _ in plain]
    for (_, _, got), (_, _, want) in zip(scaled, plain):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-9, atol=0)
    # without it, every gain is SCALE times larger and passes the threshold
    unscaled = _decide(threshold, SCALE)
    assert sum(len(gs) for _, _, gs in unscaled) > sum(len(gs) for _, _, gs in plain)


def test_a_disabled_scaler_means_scale_one_and_a_non_scaler_is_refused():
    want = _decide(0.0)
    got = _decide(0.0, 1.0, torch.amp.GradScaler("cpu", init_scale=SCALE, enabled=False))
    assert [(n, r) for n, r, _ in got] == [(n, r) for n, r, _ in want]
    with pytest.raises(TypeError, match="grad_scaler=2.0 must be a torch.amp.GradScaler"):
        _decide(0.0, 1.0, 2.0)


def _accelerated(optimizer, scaler):
    """accelerate's AcceleratedOptimizer (what Trainer hands callbacks) around ``optimizer``."""
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    accelerate.Accelerator(cpu=True)              # the wrapper needs the accelerator's state
    try:
        return AcceleratedOptimizer(optimizer, device_placement=False, scaler=scaler)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def test_trainer_callback_passes_its_grad_scaler():
    import types

    from lorambo.integrations import LoRAMBoCallback

    def decide(loss_scale, grad_scaler, accelerate_scaler=False):
        """``accelerate_scaler``: hand the callback the optimizer as Trainer does, inside
        accelerate's AcceleratedOptimizer, which holds the accelerator's scaler."""
        model = _model()
        alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                                 capacity=8, interval=1, sketch_rank=4, loss_improvement_threshold=threshold)
        alloc.configure({"0": 1, "2": 1})
        opt = alloc.make_optimizer(lr=0.0)
        callback = LoRAMBoCallback(alloc, grad_scaler=None if accelerate_scaler else grad_scaler)
        if accelerate_scaler:
            opt = _accelerated(opt, grad_scaler)
        args, state = types.SimpleNamespace(should_save=False, output_dir="unused"), types.SimpleNamespace(global_step=0)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
        callback.on_step_begin(args, state, None)        # Trainer's event order for one step
        (((model(x) - y) ** 2).mean() * loss_scale).backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=opt)
        return [(r["layer"], r["new_rank"]) for r in callback.decisions]

    gains = sorted(g for _, _, gs in _decide(0.0) for g in gs)
    threshold = (gains[0] + gains[-1]) / 2
    want = [(n, r) for n, r, _ in _decide(threshold)]
    assert decide(SCALE, torch.amp.GradScaler("cpu", init_scale=SCALE)) == want
    assert decide(SCALE, None) != want
    # Trainer(fp16=True): the scaler is found on accelerate's optimizer wrapper, none need be given
    assert decide(SCALE, torch.amp.GradScaler("cpu", init_scale=SCALE), accelerate_scaler=True) == want
    assert decide(1.0, None, accelerate_scaler=True) == want      # bf16/fp32: the wrapper has none


def test_trainer_callback_scores_importance_on_unscaled_gradients():
    """Trainer unscales the gradients before on_pre_optimizer_step only when it clips them
    (max_grad_norm > 0); otherwise AdaLoRA importance saw gradients times the loss scale (its
    scores times its square), so move_threshold meant something else under fp16."""
    import types

    from lorambo.integrations import LoRAMBoCallback
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    def scores_and_pools(grad_scaler):
        model = _model()
        alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                                 capacity=8, interval=None)
        alloc.configure({"0": 2, "2": 2})
        with torch.no_grad():
            for name in ("0", "2"):
                model.get_submodule(name).lora_B.normal_(generator=torch.Generator().manual_seed(2))
        importance = AdaLoRAImportance(model)
        inner = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        callback = LoRAMBoCallback(alloc, importance=importance)
        args, state = types.SimpleNamespace(should_save=False, output_dir="unused"), types.SimpleNamespace(global_step=0)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
        loss = ((model(x) - y) ** 2).mean()
        (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=_accelerated(inner, grad_scaler))
        if grad_scaler is not None:   # what accelerate's optimizer.step() does next
            grad_scaler.step(inner)
            grad_scaler.update()
        else:
            inner.step()
        scores = importance.component_scores()
        return scores, [p.detach().clone() for p in model.parameters() if p.requires_grad]

    want_scores, want_pools = scores_and_pools(None)
    got_scores, got_pools = scores_and_pools(torch.amp.GradScaler("cpu", init_scale=SCALE))
    for name in want_scores:
        assert float(want_scores[name].abs().max()) > 0
        torch.testing.assert_close(got_scores[name], want_scores[name], rtol=1e-9, atol=0)
    for got, want in zip(got_pools, want_pools):    # the optimizer step itself is unchanged
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("call", ["step", "update_ranks", "fsdp.allocator_step"])
def test_plain_loop_finds_the_scaler_of_the_accelerated_optimizer_it_is_given(call):
    """A plain accelerate loop under fp16 hands ``opt.step`` the optimizer ``accelerator.prepare``
    returned, which holds the accelerator's GradScaler. The decision took the captured gradients
    (times the loss scale) as they were, so more ranks passed the threshold than unscaled."""

    def decide(loss_scale, grad_scaler):
        model = _model()
        alloc = LoRAMBoOptimizer(model, 2000, sensitivity_method="frobenius", target_modules=["0", "2"],
                                 capacity=8, interval=1, sketch_rank=4, loss_improvement_threshold=threshold)
        alloc.configure({"0": 1, "2": 1})
        opt = _accelerated(alloc.make_optimizer(lr=0.0), grad_scaler)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
        with alloc.capture(0):
            (((model(x) - y) ** 2).mean() * loss_scale).backward()
        if call == "step":
            records = alloc.step(0, optimizer=opt)
        elif call == "update_ranks":
            records = alloc.update_ranks(optimizer=opt, step=0)
        else:  # the FSDP2 entry point hands the decision a proxy of the optimizer, not the wrapper
            from lorambo.integrations import fsdp

            records = fsdp.allocator_step(alloc, 0, opt)
        return [(r["layer"], r["new_rank"], r["gains"]) for r in records]

    gains = sorted(g for _, _, gs in _decide(0.0) for g in gs)
    threshold = (gains[0] + gains[-1]) / 2
    want = _decide(threshold)
    got = decide(SCALE, torch.amp.GradScaler("cpu", init_scale=SCALE))
    assert [(n, r) for n, r, _ in got] == [(n, r) for n, r, _ in want]
    for (_, _, g), (_, _, w) in zip(got, want):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-9, atol=0)
    assert [(n, r) for n, r, _ in decide(1.0, None)] == [(n, r) for n, r, _ in want]  # bf16/fp32: no scaler


def test_trainer_callback_with_moves_skips_an_overflowed_step_whole():
    """fp16 Trainer with importance scores and rank moves: a step whose scaled gradients
    overflowed (the GradScaler skips it) made the importance averages inf/NaN for good, and the
    next decision raised a ValueError on the NaN scores. The step now changes nothing: the run
    decides and trains as one that never had it."""
    import types

    from lorambo.integrations import LoRAMBoCallback
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    def run(overflow_first):
        model = _model()
        budget = 2 * (8 + 16) + 2 * (16 + 8)  # what ranks 2 and 2 spend: only moves can grow a layer
        alloc = LoRAMBoOptimizer(model, budget, sensitivity_method="frobenius", target_modules=["0", "2"],
                                 capacity=4, interval=1, sketch_rank=2, move_threshold=1e30, max_moves=1)
        alloc.configure({"0": 2, "2": 2})
        with torch.no_grad():
            for name in ("0", "2"):
                model.get_submodule(name).lora_B.normal_(generator=torch.Generator().manual_seed(2))
        importance = AdaLoRAImportance(model)
        inner = alloc.make_optimizer(lr=1e-2)
        scaler = torch.amp.GradScaler("cpu", init_scale=SCALE)
        callback = LoRAMBoCallback(alloc, importance=importance)
        opt = _accelerated(inner, scaler)
        args = types.SimpleNamespace(should_save=False, output_dir="unused")
        gen = torch.Generator().manual_seed(1)
        batches = [(torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen))
                   for _ in range(3)]
        for step, (x, y) in enumerate(batches):
            if step == 0 and not overflow_first:
                continue  # the same step numbers: they seed the new rows of A
            state = types.SimpleNamespace(global_step=step)
            callback.on_step_begin(args, state, None)
            loss = ((model(x) - y) ** 2).mean() * (float("inf") if overflow_first and step == 0 else 1.0)
            scaler.scale(loss).backward()
            if overflow_first and step == 0:
                with pytest.warns(RuntimeWarning, match="step 0: the LoRA gradients are not finite"):
                    callback.on_pre_optimizer_step(args, state, None, optimizer=opt)
            else:
                callback.on_pre_optimizer_step(args, state, None, optimizer=opt)
            scaler.step(inner)
            scaler.update()
            inner.zero_grad()
        moves = [(r["layer"], r["event"], r["old_rank"], r["new_rank"], r.get("scores")) for r in callback.decisions]
        return moves, [p.detach().clone() for p in model.parameters() if p.requires_grad], importance

    want_moves, want_pools, _ = run(overflow_first=False)
    got_moves, got_pools, importance = run(overflow_first=True)
    assert any(event == "shrink" for _, event, _, _, _ in want_moves)  # the scores moved ranks
    assert [m[:4] for m in got_moves] == [m[:4] for m in want_moves]
    for got, want in zip(got_moves, want_moves):
        if want[4] is not None:
            torch.testing.assert_close(torch.tensor(got[4]), torch.tensor(want[4]), rtol=1e-12, atol=0)
    for got, want in zip(got_pools, want_pools):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    assert (importance.steps, importance.skipped_steps) == (2, 1)


def test_subsampled_float16_capture_decides_at_any_loss_scale_the_step_survives():
    """fp16 autocast with ``max_tokens``: the capture multiplied the kept float16 dY rows by
    T / m = 16 in float16, so at loss scales the training step came through (2^10, 2^11) the
    captured rows overflowed and the decision was skipped as not finite. The scale must not
    change the decision: equal to the one at loss scale 1, where nothing comes near 65504."""

    def decide(scale):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
        alloc = LoRAMBoOptimizer(model, 10**6, sensitivity_method="frobenius", capacity={"0": 8, "2": 4},
                                 interval=1, sketch_rank=2, max_tokens=16)
        alloc.configure({"0": 1, "2": 1})
        opt = alloc.make_optimizer(lr=1e-3)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(4, 64, 8, generator=gen), torch.randn(4, 64, 4, generator=gen)
        with alloc.capture(0), torch.autocast("cpu", dtype=torch.float16):
            loss = ((model(x) - y) ** 2).sum()   # 256 tokens, 16 kept per call
        scaler.scale(loss).backward()
        records = alloc.step(0, optimizer=opt, grad_scaler=scaler)
        scaler.step(opt)
        scaler.update()
        assert scaler.get_scale() == scale     # the training step did not overflow
        return [(r["layer"], r["new_rank"], r["gains"]) for r in records]

    want = decide(1.0)
    assert want
    for scale in (2.0 ** 10, 2.0 ** 11):
        got = decide(scale)
        assert [(n, r) for n, r, _ in got] == [(n, r) for n, r, _ in want]
        for (_, _, g), (_, _, w) in zip(got, want):
            torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=1e-5, atol=0)


def test_trainer_callback_runs_an_alora_round_at_an_overflowed_step():
    """ALoRA scores components by ablation on held-out batches, not by the importance averages:
    an overflowed step (which the importance leaves out) keeps its round."""
    import types

    from lorambo.allocation.alora import ALoRAConfig
    from lorambo.integrations import LoRAMBoCallback
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    from residual_net import ResidualNet, mse

    torch.manual_seed(0)
    model = ResidualNet(hidden=12)
    heldout = [(x, torch.randn(16, 8, dtype=DT)) for x in (torch.randn(16, 8, dtype=DT) for _ in range(2))]
    alloc = LoRAMBoOptimizer(model, 20 * 12, allocation="alora", loss_fn=mse, heldout_batches=heldout,
                             alora=ALoRAConfig(k1=0, k2=3, rounds=2, n_prune=2), move_threshold=1.0)
    alloc.compute_optimal_ranks()
    alloc.configure()
    importance = AdaLoRAImportance(model)
    callback = LoRAMBoCallback(alloc, importance=importance)
    args, state = types.SimpleNamespace(should_save=False, output_dir="unused"), types.SimpleNamespace(global_step=0)
    callback.on_step_begin(args, state, None)
    (mse(model, (torch.randn(16, 8, dtype=DT), torch.randn(16, 8, dtype=DT))) * float("inf")).backward()
    callback.on_pre_optimizer_step(args, state, None, optimizer=alloc.make_optimizer(lr=0.0))
    assert importance.skipped_steps == 1
    assert alloc.alora_schedule().rounds_done == 1 and callback.decisions


def test_an_overflowed_decision_step_leaves_no_capture_behind():
    """The callback skips the decision of an overflowed step; it must still drop that step's
    capture, as a decision does: the activation hooks off every layer and the recorded X and dY
    freed, rather than held (memory) and hooked until the next step begins."""
    import types

    from lorambo.integrations import LoRAMBoCallback
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    model = _model()
    alloc = LoRAMBoOptimizer(model, 2 * (8 + 16) + 2 * (16 + 8), sensitivity_method="frobenius",
                             target_modules=["0", "2"], capacity=4, interval=1, sketch_rank=2,
                             move_threshold=1e30, max_moves=1)
    alloc.configure({"0": 2, "2": 2})
    layers = [model.get_submodule(name) for name in ("0", "2")]
    hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]
    callback = LoRAMBoCallback(alloc, importance=AdaLoRAImportance(model))
    inner = alloc.make_optimizer(lr=1e-2)
    args, state = types.SimpleNamespace(should_save=False, output_dir="unused"), types.SimpleNamespace(global_step=0)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 3, dtype=DT, generator=gen)
    callback.on_step_begin(args, state, None)
    (((model(x) - y) ** 2).mean() * float("inf")).backward()
    capture = alloc.scheduled_growth._growth.capture
    assert any(capture.inputs[n] for n in capture.layers)  # the step was captured
    with pytest.warns(RuntimeWarning, match="step 0: the LoRA gradients are not finite"):
        callback.on_pre_optimizer_step(args, state, None, optimizer=inner)
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers] == hooks_before
    assert not any(capture.inputs[n] or capture.grads[n] for n in capture.layers)
