"""A growth decision stopped part-way (out of memory aligning one layer's new rows, Ctrl-C)
keeps the growths it finished, logged, takes back the one it was in, and leaves the rest alone."""

import copy

import pytest
import torch

from lorambo.allocation import online
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

pytestmark = pytest.mark.usefixtures("one_thread")

DT = torch.float64
_G = torch.Generator().manual_seed(3)
DATA = [(torch.randn(12, 8, generator=_G, dtype=DT), torch.randn(12, 8, generator=_G, dtype=DT)) for _ in range(4)]


def _at_decision():
    """A run stopped between the backward of its first decision step (step 1: all six layers
    grow) and ``opt.step``; the torch optimizer has stepped once."""
    torch.manual_seed(0)
    model = ResidualNet(blocks=3)
    opt = LoRAMBoOptimizer(model, 3000, sensitivity_method="gradient", initial_budget=300, warmup_steps=1,
                           interval=1, sketch_rank=1, heldout_batches=DATA[-2:], loss_fn=mse)
    opt.compute_optimal_ranks(DATA[:2], mse)
    opt.configure()
    torch_opt = opt.make_optimizer(lr=2e-2)
    for step in range(2):
        with opt.capture(step):
            mse(model, DATA[step]).backward()
        if step == 0:
            opt.step(step)
            torch_opt.step()
            torch_opt.zero_grad()
    return model, opt, torch_opt


def _layer_state(model, torch_opt, name):
    layer = model.get_submodule(name)
    out = {"rank": layer.rank}
    for pool in ("lora_A", "lora_B"):
        param = getattr(layer, pool)
        out[pool] = param.detach().clone()
        out[pool + ".grad"] = param.grad.clone()
        out[pool + ".state"] = {k: v.clone() for k, v in torch_opt.state[param].items()}
    return out


def _assert_same(a, b, name):
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith(".state"):
            assert a[key].keys() == b[key].keys(), (name, key)
            for k in a[key]:
                assert torch.equal(a[key][k], b[key][k]), (name, key, k)
        elif torch.is_tensor(a[key]):
            assert torch.equal(a[key], b[key]), (name, key)
        else:
            assert a[key] == b[key], (name, key)


@pytest.mark.parametrize("fault", [torch.OutOfMemoryError, KeyboardInterrupt])
@pytest.mark.parametrize("k", [1, 3, 6])  # the first, a middle, the last of the six growths
def test_a_growth_stopped_at_layer_k(monkeypatch, fault, k):
    """Stopped at growth k: the layers grown before it stay grown and are in opt.decisions and the
    log (a resume from opt.state_dict() accepts the model's ranks), and layer k is taken back
    rather than left grown with plain Kaiming rows instead of the aligned ones."""
    ref_model, ref_opt, ref_torch_opt = _at_decision()
    ref_records = ref_opt.step(1)
    names = [r["layer"] for r in ref_records]
    assert len(names) == 6
    model, opt, torch_opt = _at_decision()
    before = {n: _layer_state(model, torch_opt, n) for n in names}
    calls, real = [], online._activation_ratio

    def ratio(*args):  # the temporaries of one layer's aligned rows
        calls.append(1)
        if len(calls) == k:
            raise fault("out of memory") if fault is not KeyboardInterrupt else fault
        return real(*args)

    monkeypatch.setattr(online, "_activation_ratio", ratio)
    with pytest.raises(fault) as err:
        opt.step(1)
    done = ref_records[:k - 1]
    assert opt.decisions == done
    notes = getattr(err.value, "__notes__", [])
    assert notes == ([] if k == 1 else [
        f"update_ranks (step 1) stopped after {k - 1} rank change(s) "
        f"{[(r['layer'], r['old_rank'], r['new_rank']) for r in done]}, which stay and are in the decisions "
        "and the decision log; the rest of the decision was not taken"])
    for i, name in enumerate(names):
        want = _layer_state(ref_model, ref_torch_opt, name) if i < k - 1 else before[name]
        _assert_same(_layer_state(model, torch_opt, name), want, name)


def _move_decision(log):
    """OnlineGrowth with no budget left and two rank moves to take: components of two donors
    (worst scores) fund one rank each elsewhere."""
    import lorambo
    from lorambo.allocation.online import OnlineGrowth

    torch.manual_seed(0)
    model = lorambo.configure_model(ResidualNet(width=8, hidden=12), 2, capacity=6)
    gen = torch.Generator().manual_seed(1)
    for layer in lorambo.lora_layers(model).values():
        layer.lora_B.data[:, :2].normal_(generator=gen)
    layers = lorambo.lora_layers(model)
    spent = sum((m.in_features + m.out_features) * m.rank for m in layers.values())
    grower = OnlineGrowth(layers, spent, sketch_rank=2, power_iters=3, seed=3, move_threshold=1.0, max_moves=2,
                          log=log)
    with grower.capture:
        mse(model, DATA[0]).backward()
    scores = {n: torch.tensor([0.5, 0.6], dtype=DT) for n in layers}
    scores["blocks.0.up"] = torch.tensor([0.7, -1.0], dtype=DT)
    scores["blocks.1.down"] = torch.tensor([-2.0, 0.9], dtype=DT)
    return model, grower, scores


def test_a_move_stopped_between_its_donors_records_the_shrink_it_made(monkeypatch):
    """Without the compiled pool remap (CUDA pools) the donors shrink one by one: stopped at the
    second, the first had shrunk with no record in the decisions or the log."""
    import lorambo
    from lorambo.allocation.report import DecisionLog
    from lorambo.nn import lora_linear

    lorambo.set_backend("torch")  # the per-layer loop CUDA pools take
    _, ref, scores = _move_decision(DecisionLog())
    ref_records = ref.update(step=5, component_scores=scores)
    assert [r["event"] for r in ref_records][:2] == ["shrink", "shrink"]  # two donors, then the receivers
    first = ref_records[0]["layer"]
    model, grower, scores = _move_decision(DecisionLog())
    calls, real = [], lora_linear.LoRAMBoLinear.keep_components

    def keep_components(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("out of memory")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lora_linear.LoRAMBoLinear, "keep_components", keep_components)
    with pytest.raises(torch.OutOfMemoryError) as err:
        grower.update(step=5, component_scores=scores)
    (shrink,) = grower.log.records  # as in the full decision, but "spent" of the model as it is now
    assert {k: v for k, v in shrink.items() if k != "spent"} == {k: v for k, v in ref_records[0].items() if k != "spent"}
    assert shrink["spent"] == grower.spent()
    assert getattr(err.value, "__notes__", []) == [
        f"update_ranks (step 5) stopped after 1 rank change(s) [({first!r}, 2, 1)], which stay and are in the "
        "decisions and the decision log; the rest of the decision was not taken"]
    assert {n: m.rank for n, m in lorambo.lora_layers(model).items()} == {
        n: 1 if n == first else 2 for n in lorambo.lora_layers(model)}
