"""Online growth: the benefit estimate, the plan, and growth events inside a training loop."""

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorambo
from lorambo.allocation.online import (ActivationCapture, OnlineGrowth, plan_growth, plan_moves,
                                       projected_top_singular, subspace_basis)
from lorambo.optimizer import LoRAMBoOptimizer

DT = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _dense_perp(x, dy, a_rows, b_cols):
    g = dy.T @ x
    pa = torch.eye(x.shape[1], dtype=DT)
    pb = torch.eye(dy.shape[1], dtype=DT)
    if a_rows.shape[0]:
        q = torch.linalg.qr(a_rows.T).Q
        pa = pa - q @ q.T
    if b_cols.shape[1] and b_cols.abs().max() > 0:
        q = torch.linalg.qr(b_cols).Q
        pb = pb - q @ q.T
    return pb @ g @ pa


@pytest.mark.parametrize("b_zero", [False, True])
def test_benefit_matches_dense_projected_svd(b_zero):
    # The sketch (k + oversample = 6 columns) is much narrower than the layer (24 x 20), so the
    # answer comes from the power iteration: few iterations are visibly off, more converge.
    n_in, n_out, r, k, t = 24, 20, 2, 2, 40
    u = torch.linalg.qr(torch.randn(t, t, dtype=DT)).Q
    x = u[:, :n_in] @ torch.diag(0.5 ** torch.arange(n_in, dtype=DT)) @ torch.linalg.qr(
        torch.randn(n_in, n_in, dtype=DT)).Q                                  # decaying spectrum
    dy = torch.randn(t, n_out, dtype=DT)
    a_rows = torch.randn(r, n_in, dtype=DT)
    b_cols = torch.zeros(n_out, r, dtype=DT) if b_zero else torch.randn(n_out, r, dtype=DT)
    exact = torch.linalg.svd(_dense_perp(x, dy, a_rows, b_cols))
    # two calls (gradient accumulation) sum to the same G
    pairs = [(x[:12], dy[:12]), (x[12:], dy[12:])]

    def estimate(niter):
        return projected_top_singular(pairs, n_in, n_out, k, subspace_basis(a_rows.T), subspace_basis(b_cols),
                                      niter=niter, generator=torch.Generator().manual_seed(3))

    rough, _ = estimate(0)
    sigma, vecs = estimate(12)
    assert float((rough - exact.S[:k]).abs().max() / exact.S[0]) > 1e-6  # the iteration has work to do
    torch.testing.assert_close(sigma, exact.S[:k], rtol=1e-10, atol=1e-12)
    for j in range(k):  # same singular directions (up to sign), orthogonal to the rows of A
        assert abs(float(vecs[:, j] @ exact.Vh[j])) == pytest.approx(1.0, abs=1e-8)
        assert float((a_rows @ vecs[:, j]).abs().max()) < 1e-10


def test_benefit_power_iteration_on_larger_layer():
    n_in, n_out, t = 60, 50, 80
    # a planted decaying spectrum: X, dY with singular values 1, 0.5, 0.25, ...
    u = torch.linalg.qr(torch.randn(t, t, dtype=DT)).Q
    x = u[:, :n_in] @ torch.diag(0.6 ** torch.arange(n_in, dtype=DT)) @ torch.linalg.qr(
        torch.randn(n_in, n_in, dtype=DT)).Q
    dy = u[:, :n_out] @ torch.randn(n_out, n_out, dtype=DT)
    a_rows = torch.randn(3, n_in, dtype=DT)
    b_cols = torch.randn(n_out, 3, dtype=DT)
    exact = torch.linalg.svdvals(_dense_perp(x, dy, a_rows, b_cols))
    sigma, _ = projected_top_singular([(x, dy)], n_in, n_out, 2, subspace_basis(a_rows.T),
                                      subspace_basis(b_cols), niter=6)
    assert float(sigma[0]) <= float(exact[0]) * (1 + 1e-12)  # a Rayleigh-Ritz value: never above
    assert float(sigma[0]) == pytest.approx(float(exact[0]), rel=1e-6)
    assert float(sigma[1]) == pytest.approx(float(exact[1]), rel=1e-3)


class _Record(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.numels = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_benefit_never_materialises_the_gradient():
    n_in, n_out, t = 300, 200, 16
    x, dy = torch.randn(t, n_in), torch.randn(t, n_out)
    with _Record() as rec:
        projected_top_singular([(x, dy)], n_in, n_out, 2, subspace_basis(torch.randn(n_in, 2)), None)
    assert rec.numels and max(rec.numels) < n_in * n_out // 10


def _model(dtype=DT):
    net = nn.Sequential(nn.Linear(6, 10, dtype=dtype), nn.Tanh(), nn.Linear(10, 10, dtype=dtype),
                        nn.Tanh(), nn.Linear(10, 3, dtype=dtype))
    return lorambo.configure_model(net, {"0": 1, "2": 1, "4": 1}, capacity={"0": 6, "2": 8, "4": 3})


def _mse(model, batch):
    x, y = batch
    return ((model(x) - y) ** 2).mean()


def test_growth_is_function_preserving_and_allocation_free():
    model = _model()
    layers = lorambo.lora_layers(model)
    for layer in layers.values():  # trained-looking adapters: B != 0
        layer.lora_B.data[:, :layer.rank].normal_()
    params = {n: p for n, p in model.named_parameters()}
    ptrs = {n: (p.data_ptr(), p.untyped_storage().nbytes()) for n, p in params.items()}
    opt = LoRAMBoOptimizer(model, total_budget=10_000, interval=1, sketch_rank=2)
    torch_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    probe = torch.randn(7, 6, dtype=DT)
    events = 0
    for step in range(4):
        batch = (torch.randn(16, 6, dtype=DT), torch.randn(16, 3, dtype=DT))
        with opt.capture(step):
            _mse(model, batch).backward()
        with torch.no_grad():
            before = model(probe)
        records = opt.step(step, optimizer=torch_opt)
        with torch.no_grad():
            after = model(probe)
        events += len(records)
        assert float((after - before).norm() / before.norm()) <= 1e-12
        for rec in records:  # the optimizer state of the new slots starts at zero
            layer = layers[rec["layer"]]
            state = torch_opt.state.get(layer.lora_B)
            if state:
                assert state["exp_avg"][:, rec["old_rank"]:rec["new_rank"]].abs().max() == 0
        torch_opt.step()
        torch_opt.zero_grad()
        assert {n: p for n, p in model.named_parameters()} == params  # same Parameter objects
        assert {n: (p.data_ptr(), p.untyped_storage().nbytes()) for n, p in params.items()} == ptrs
        for layer in layers.values():
            assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
    assert events > 0
    assert sum(layer.rank for layer in layers.values()) > 3


def _regression_run(grow: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(8, 8, bias=False, dtype=DT)
    delta = torch.randn(8, 5, generator=g, dtype=DT) @ torch.randn(5, 8, generator=g, dtype=DT) / 3
    target = base.weight.detach() + delta
    model = lorambo.configure_model(nn.Sequential(base), {"0": 1}, capacity={"0": 8}, alpha=1.0)
    opt = LoRAMBoOptimizer(model, total_budget=16 * 8, interval=5 if grow else None, sketch_rank=2)
    torch_opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    losses = []
    for step in range(60):
        x = torch.randn(32, 8, generator=g, dtype=DT)
        with opt.capture(step):
            loss = ((model(x) - x @ target.T) ** 2).mean()
            loss.backward()
        opt.step(step, optimizer=torch_opt)
        torch_opt.step()
        torch_opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses, lorambo.lora_layers(model)["0"].rank


def test_growth_helps_and_training_continues():
    seed = int(torch.randint(0, 2**30, ()))
    fixed, r_fixed = _regression_run(False, seed)
    grown, r_grown = _regression_run(True, seed)
    assert r_fixed == 1 and r_grown > 1
    assert np.mean(grown[-10:]) < 0.5 * np.mean(grown[:5])       # training keeps going after growth
    assert np.mean(grown[-10:]) < 0.7 * np.mean(fixed[-10:])     # and the extra ranks help


def test_threshold_stops_growth_and_hooks_only_on_decision_steps():
    model = _model()
    opt = LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=2, interval=3,
                           loss_improvement_threshold=1e9)
    layers = lorambo.lora_layers(model)
    for step in range(6):
        with opt.capture(step):
            assert all(bool(m._forward_hooks) == (step in (2, 5)) for m in layers.values())
            _mse(model, (torch.randn(4, 6, dtype=DT), torch.randn(4, 3, dtype=DT))).backward()
        assert opt.step(step) == []
        assert not any(m._forward_hooks for m in layers.values())
    assert [m.rank for m in layers.values()] == [1, 1, 1]


def test_update_without_capture_is_an_error():
    opt = LoRAMBoOptimizer(_model(), total_budget=10_000, interval=1)
    with pytest.raises(RuntimeError, match="no activations were captured"):
        opt.update_ranks()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_decision_on_an_overflowed_step_is_skipped_with_a_warning(bad):
    # an fp16 GradScaler step that overflows: the decision must not crash training (it raised
    # torch.linalg's LinAlgError from inside the power iteration) nor change any rank
    torch.manual_seed(11)
    model = _model()
    opt = LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=1)
    layers = lorambo.lora_layers(model)
    batch = (torch.randn(8, 6, dtype=DT), torch.randn(8, 3, dtype=DT))
    with opt.capture(0):
        (_mse(model, batch) * bad).backward()
    with pytest.warns(RuntimeWarning, match="not finite"):
        assert opt.step(0) == []
    assert [m.rank for m in layers.values()] == [1, 1, 1]
    model.zero_grad()
    with opt.capture(1):  # the next finite step decides as usual
        _mse(model, batch).backward()
    assert opt.step(1) and sum(m.rank for m in layers.values()) > 3


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 30), st.integers(0, 5),
                          st.lists(st.floats(0, 10), min_size=1, max_size=5)), min_size=1, max_size=5),
       st.integers(0, 200), st.floats(0, 5))
def test_plan_growth_budget_threshold_and_maximality(layers, budget, threshold):
    names = [f"l{i}" for i in range(len(layers))]
    costs = {n: c for n, (c, _, _) in zip(names, layers)}
    room = {n: r for n, (_, r, _) in zip(names, layers)}
    gains = {n: sorted(g, reverse=True) for n, (_, _, g) in zip(names, layers)}
    plan = plan_growth(gains, costs, room, budget, threshold)
    spent = sum(costs[n] * a for n, a in plan.items())
    assert spent <= budget
    for n, a in plan.items():
        assert 0 < a <= min(room[n], len(gains[n])) and gains[n][a - 1] > threshold
    for n in names:  # nothing worth adding was left although it fit
        a = plan.get(n, 0)
        if a < min(room[n], len(gains[n])) and gains[n][a] > threshold:
            assert costs[n] > budget - spent


def test_rank_move_shrinks_the_worst_component_to_fund_the_best_layer():
    model = _model()
    layers = lorambo.lora_layers(model)
    for name, layer in layers.items():
        layer.set_rank(3 if name != "4" else 2)
        layer.lora_B.data[:, :layer.rank].normal_()
    spent = sum((m.in_features + m.out_features) * m.rank for m in layers.values())
    opt = LoRAMBoOptimizer(model, total_budget=spent, interval=1, move_threshold=0.5)
    scores = {n: torch.rand(m.rank) + 1.0 for n, m in layers.items()}
    scores["0"][1] = -0.3  # the one component below the move threshold
    x = torch.randn(9, 6, dtype=DT)
    with opt.capture(0):
        _mse(model, (torch.randn(16, 6, dtype=DT), torch.randn(16, 3, dtype=DT))).backward()
    reference = copy.deepcopy(model)
    lorambo.lora_layers(reference)["0"].keep_components([0, 2])
    records = opt.step(0, component_scores=scores)
    events = [(r["event"], r["layer"]) for r in records]
    assert ("shrink", "0") in events and sum(e == "grow" for e, _ in events) == 1
    assert layers["0"].rank == 2
    assert sum((m.in_features + m.out_features) * m.rank for m in layers.values()) <= spent
    with torch.no_grad():  # the only change of function is the removed component
        torch.testing.assert_close(model(x), reference(x), rtol=1e-12, atol=1e-12)


def test_plan_moves_never_uses_a_layer_twice_or_exceeds_budget():
    costs = {"a": 10, "b": 20, "c": 10}
    moves = plan_moves({"a": 5.0, "b": 4.0, "c": 0.1}, {"b": [0.0, 0.05], "c": [0.01]}, costs,
                       {"a": 1, "b": 1, "c": 1}, 0, threshold=0.5, move_threshold=0.1, max_moves=3)
    assert moves[0] == ("b", 0, "a") or moves[0] == ("c", 0, "a")
    donors = {d for d, _, _ in moves}
    assert not donors & {r for _, _, r in moves}
    left = sum(costs[d] - costs[r] for d, _, r in moves)
    assert left >= 0


def test_capture_pairs_each_call_with_its_gradient():
    layer = lorambo.LoRAMBoLinear(nn.Linear(4, 5, dtype=DT), rank=1)
    cap = ActivationCapture({"l": layer})
    x1, x2 = torch.randn(3, 4, dtype=DT), torch.randn(2, 4, dtype=DT)
    with cap:
        y1, y2 = layer(x1), layer(x2)  # used twice: backward visits them in reverse order
        w1, w2 = torch.randn(3, 5, dtype=DT), torch.randn(2, 5, dtype=DT)
        ((y1 * w1).sum() + (y2 * w2).sum()).backward()
    (a, ga), (b, gb) = cap.pairs("l")
    assert torch.equal(a, x1) and torch.equal(ga, w1) and torch.equal(b, x2) and torch.equal(gb, w2)
    grower = OnlineGrowth({"l": layer}, budget=100)
    assert grower.capture.has_data() is False


def test_capture_records_a_layer_called_by_keyword():
    """layer(x=...) is a valid call; the hook took args[0] and crashed training with an
    IndexError on the decision step."""
    layer = lorambo.LoRAMBoLinear(nn.Linear(4, 5, dtype=DT), rank=1)
    cap = ActivationCapture({"l": layer})
    x, w = torch.randn(3, 4, dtype=DT), torch.randn(3, 5, dtype=DT)
    with cap:
        (layer(x=x) * w).sum().backward()
    ((a, ga),) = cap.pairs("l")
    assert torch.equal(a, x) and torch.equal(ga, w)


@pytest.mark.parametrize("backend", ["torch", "ext"])
def test_capture_keeps_dy_of_an_output_modified_in_place(backend):
    """The layer's output was a view (a reshape of the op's rows), and autograd drops the hooks
    of a view modified in place (ReLU(inplace=True), h += residual): the decision saw no dY for
    that layer. dY is d loss / d output before the in-place op."""
    from lorambo.ops import backend as backends

    if backend == "ext" and not lorambo.ext.ops.available():
        pytest.skip("compiled extension not built")
    backends.set_backend(backend)
    try:
        layer = lorambo.LoRAMBoLinear(nn.Linear(4, 5, dtype=DT), rank=1)
        cap = ActivationCapture({"l": layer})
        gen = torch.Generator().manual_seed(0)
        x, w = torch.randn(2, 3, 4, dtype=DT, generator=gen), torch.randn(2, 3, 5, dtype=DT, generator=gen)
        with cap:
            h = layer(x)
            (torch.relu_(h) * w).sum().backward()
    finally:
        backends.set_backend(None)
    ((a, g),) = cap.pairs("l")
    pre = x.reshape(6, 4) @ layer.weight.detach().T + layer.bias.detach()   # B = 0: the base layer
    torch.testing.assert_close(g, (w.reshape(6, 5) * (pre > 0)), rtol=0, atol=0)
    assert torch.equal(a, x.reshape(6, 4))


def test_capture_max_tokens_keeps_matching_rows_scaled():
    layer = lorambo.LoRAMBoLinear(nn.Linear(4, 5, dtype=DT), rank=1)
    cap = ActivationCapture({"l": layer}, max_tokens=10)
    x = torch.randn(2, 25, 4, dtype=DT)
    w = torch.randn(2, 25, 5, dtype=DT)
    with cap:
        (layer(x) * w).sum().backward()
    ((xs, dys),) = cap.pairs("l")
    rows = [i * 49 // 9 for i in range(10)]
    assert torch.equal(xs, x.reshape(50, 4)[rows])
    torch.testing.assert_close(dys, w.reshape(50, 5)[rows] * 5.0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="max_tokens=0"):
        ActivationCapture({"l": layer}, max_tokens=0)


@pytest.mark.parametrize("default_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tokens,max_tokens", [(17, 15), (51, 23)])
def test_capture_max_tokens_rows_do_not_depend_on_the_default_dtype(default_dtype, tokens, max_tokens):
    # a float linspace truncated 24.999... to row 24 under float64 (51 tokens, 23 kept) and
    # missed rows under float32 (17, 15): the decision depended on torch's default dtype
    layer = lorambo.LoRAMBoLinear(nn.Linear(4, 5, dtype=DT), rank=1)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, 4, generator=g, dtype=DT)
    cap = ActivationCapture({"l": layer}, max_tokens=max_tokens)
    old = torch.get_default_dtype()
    torch.set_default_dtype(default_dtype)
    try:
        with cap:
            layer(x).sum().backward()
    finally:
        torch.set_default_dtype(old)
    ((xs, dys),) = cap.pairs("l")
    rows = [i * (tokens - 1) // (max_tokens - 1) for i in range(max_tokens)]
    assert torch.equal(xs, x[rows])
    assert torch.equal(dys, torch.full((max_tokens, 5), tokens / max_tokens, dtype=DT))


def test_grown_rows_respond_to_inputs_like_kaiming_rows():
    # anisotropic inputs: a top singular direction of G follows the large input directions, so a
    # row of Kaiming norm along it would respond far more strongly than a random Kaiming row
    from lorambo.allocation.online import grow_layer
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    n_in, n_out = 40, 6
    scales = torch.logspace(1, -1, n_in, dtype=DT)
    x = torch.randn(500, n_in, generator=gen, dtype=DT) * scales
    model = lorambo.configure_model(nn.Sequential(nn.Linear(n_in, n_out, dtype=DT)), {"0": 1},
                                    capacity={"0": 4})
    layer = lorambo.lora_layers(model)["0"]
    plain = copy.deepcopy(layer)  # the same growth without directions: plain Kaiming rows
    grow_layer(plain, 3, generator=torch.Generator().manual_seed(5))
    directions = torch.eye(n_in, 2, dtype=DT)  # the two largest input directions (scale 10, 8.9)
    grow_layer(layer, 3, directions, generator=torch.Generator().manual_seed(5), inputs=[x[:200], x[200:]])
    rms_x = float(x.pow(2).mean().sqrt())
    for j in range(2):
        new, kaiming = layer.lora_A[1 + j].detach(), plain.lora_A[1 + j].detach()
        assert abs(float(new @ directions[:, j])) == pytest.approx(float(new.norm()), rel=1e-12)
        # rms(a.x) of a random row of norm rho is rho * rms(x entries); the aligned row matches it
        assert float((x @ new).pow(2).mean().sqrt()) == pytest.approx(float(kaiming.norm()) * rms_x, rel=1e-10)
        assert float(new.norm()) < 0.5 * float(kaiming.norm())  # along a large input direction
    assert not layer.lora_B[:, 1:3].any()


@pytest.mark.parametrize("kwargs, message", [
    (dict(sketch_rank=0), "sketch_rank=0 must be an int >= 1"),               # grew nothing, silently
    (dict(sketch_rank=2.5), "sketch_rank=2.5 must be an int >= 1"),           # ran as 2
    (dict(sketch_rank=-1), "sketch_rank=-1 must be an int >= 1"),             # torch.zeros error
    (dict(power_iters=-1), "power_iters=-1 must be an int >= 0"),
    (dict(loss_improvement_threshold=float("nan")), "loss_improvement_threshold=nan must be a real"),
    (dict(move_threshold=float("nan")), "move_threshold=nan must be a real"),
    (dict(max_moves=0), "max_moves=0 must be an int >= 1"),
    (dict(max_tokens=0), "max_tokens=0 must be an int >= 1"),
])
def test_bad_online_settings_are_refused_at_construction(kwargs, message):
    """They were used as given at the first decision step, maybe hours into training: a NaN
    threshold or sketch_rank=0 meant no growth ever, without a word."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10, dtype=DT), nn.Tanh(), nn.Linear(10, 3, dtype=DT))
    model = lorambo.configure_model(net, 1, capacity={"0": 4, "2": 3})
    with pytest.raises(ValueError, match=message):
        LoRAMBoOptimizer(model, total_budget=200, interval=1, **kwargs)
    online = {("threshold" if k == "loss_improvement_threshold" else k): v for k, v in kwargs.items()}
    with pytest.raises(ValueError, match=message.split("=")[0].replace("loss_improvement_", "")):
        OnlineGrowth(lorambo.lora_layers(model), 200, **online)
    for bad in (float("nan"), -5, float("inf")):
        with pytest.raises(ValueError, match=f"budget={bad!r} must be a finite number"):
            OnlineGrowth(lorambo.lora_layers(model), bad)


def _decision_ready(move_threshold=None):
    """A trained-looking model one Adam step in, its allocator, and a captured decision step:
    layer "4" is full (no room to grow), the others can grow."""
    torch.manual_seed(5)
    model = _model()
    layers = lorambo.lora_layers(model)
    layers["4"].set_rank(3)
    for layer in layers.values():
        layer.lora_B.data[:, :layer.rank].normal_()
    opt = LoRAMBoOptimizer(model, total_budget=10_000, interval=1, sketch_rank=2, move_threshold=move_threshold)
    torch_opt = opt.make_optimizer(lr=1e-2)
    batch = (torch.randn(16, 6, dtype=DT), torch.randn(16, 3, dtype=DT))
    _mse(model, batch).backward()
    torch_opt.step()
    torch_opt.zero_grad()
    with opt.capture(0):
        _mse(model, batch).backward()
    return model, opt, torch_opt


def _snapshot(model, torch_opt):
    state = {n: t.clone() for n, t in model.state_dict().items()}
    state.update({f"opt.{i}.{k}": v.clone() for i, s in enumerate(torch_opt.state.values()) for k, v in s.items()})
    return state


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("failure", ["merged layer", "scores of the wrong length"])
def test_a_refused_decision_changes_nothing_and_can_be_retried(failure):
    """A decision refused midway (a merged layer it grows after another; scores of another length
    than its rank for a layer it does not grow) grew the other layers first, then raised: ranks, pools and Adam state changed, nothing
    was logged, and the captured step was gone. Now it refuses before any change, and the retry
    decides exactly as an uninterrupted decision."""
    moves = 0.5 if failure.startswith("scores") else None
    reference, ref_opt, ref_torch_opt = _decision_ready(moves)
    model, opt, torch_opt = _decision_ready(moves)
    good = {n: torch.linspace(1.0, 2.0, m.rank, dtype=DT) for n, m in lorambo.lora_layers(model).items()}
    expected = ref_opt.step(0, component_scores=good if moves else None)
    grown = [r["layer"] for r in expected if r["event"] == "grow"]
    assert grown[:2] == ["0", "2"]  # "0" grows before the failure is met
    before = _snapshot(model, torch_opt)
    if failure == "merged layer":
        lorambo.lora_layers(model)["2"].merge()  # a layer the decision grows, after another
        with pytest.raises(RuntimeError, match=r"'2'.*unmerge\(\)"):
            opt.step(0)
        lorambo.lora_layers(model)["2"].unmerge()
        bad = None
    else:
        bad = {**good, "4": good["4"][:2]}
        with pytest.raises(ValueError, match=r"component_scores\['4'\] must be 3 finite numbers"):
            opt.step(0, component_scores=bad)
    _assert_same(_snapshot(model, torch_opt), before)
    assert opt.decisions == []
    assert opt.step(0, component_scores=good if moves else None) == expected
    _assert_same(_snapshot(model, torch_opt), _snapshot(reference, ref_torch_opt))


@pytest.mark.parametrize("min_rank", [0, 2])
def test_a_move_funds_the_first_new_rank_of_a_layer_the_plan_did_not_grow(min_rank):
    # a layer that does not grow in the decision offers a move its first new rank, worth
    # sigma_1(G_perp) (dense SVD here). With the threshold between the best layer's sigma_1 and
    # every other gain (its own sigma_2 included), that layer receives the one move; a budget
    # left (12) below every layer's cost keeps the plan from growing anything. With min_rank=2
    # the donor, at rank 2, has no component to spare: nothing moves
    torch.manual_seed(0)
    model = _model()
    layers = lorambo.lora_layers(model)
    for layer in layers.values():
        layer.set_rank(2)
        layer.lora_B.data[:, :2].normal_()
    costs = {n: m.in_features + m.out_features for n, m in layers.items()}
    spent = sum(costs[n] * m.rank for n, m in layers.items())
    batch = (torch.randn(16, 6, dtype=DT), torch.randn(16, 3, dtype=DT))
    sigmas = {}
    with ActivationCapture(layers) as cap:
        _mse(model, batch).backward()
    for n, m in layers.items():
        (x, dy), = cap.pairs(n)
        sigmas[n] = torch.linalg.svdvals(_dense_perp(x, dy, m.lora_A[:2].detach(), m.lora_B[:, :2].detach()))
    best = max(sigmas, key=lambda n: sigmas[n][0])
    below = max([float(sigmas[best][1])] + [float(s[0]) for n, s in sigmas.items() if n != best])
    assert below < 0.9 * float(sigmas[best][0])  # a clear gap (a check of the test itself)
    donor = next(n for n in layers if n != best)
    grower = OnlineGrowth(layers, spent + 12, sketch_rank=2, power_iters=8, seed=1,
                          threshold=(below + float(sigmas[best][0])) / 2, move_threshold=0.5,
                          min_rank=min_rank)
    with grower.capture:
        _mse(model, batch).backward()
    scores = {n: torch.tensor([1.0, 1.0], dtype=DT) for n in layers}
    scores[donor] = torch.tensor([1.0, -1.0], dtype=DT)
    records = grower.update(step=0, component_scores=scores)
    if min_rank == 2:
        assert records == [] and all(m.rank == 2 for m in layers.values())
        return
    assert [(r["event"], r["layer"]) for r in records] == [("shrink", donor), ("grow", best)]
    assert records[1]["benefit"] == pytest.approx(float(sigmas[best][0]), rel=1e-6)
    assert {n: m.rank for n, m in layers.items()} == {n: 1 if n == donor else 3 if n == best else 2 for n in layers}
