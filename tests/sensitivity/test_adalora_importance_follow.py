"""``AdaLoRAImportance.follow(records)``: a plain loop with rank moves hands it what
``LoRAMBoOptimizer.step`` returns, and every statistic stays with its component."""

import pytest
import torch
import torch.nn as nn

import lorambo
from lorambo import LoRAMBoOptimizer
from lorambo.nn.slot_lineage import slot_ids
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

DT = torch.float64


def _moving_run():
    """A model, an allocator that moves rank between its two layers at every step, an optimizer,
    the importance, and a batch source (seeded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16, dtype=DT), nn.ReLU(), nn.Linear(16, 12, dtype=DT))
    alloc = LoRAMBoOptimizer(model, 24 * 3 + 28 * 2, sensitivity_method="frobenius", target_modules=["0", "2"],
                             capacity=8, interval=1, sketch_rank=2, power_iters=2, move_threshold=1e3)
    alloc.configure({"0": 2, "2": 1})
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(24, 8, dtype=DT, generator=gen), torch.randn(24, 12, dtype=DT, generator=gen))
               for _ in range(5)]
    return model, alloc, alloc.make_optimizer(lr=1e-2), AdaLoRAImportance(model), batches


def _train_step(model, alloc, step, batch, importance):
    x, y = batch
    with alloc.capture(step):
        ((model(x) - y) ** 2).mean().backward()
    importance.update()


def test_a_plain_loop_with_moves_keeps_each_statistic_with_its_component():
    model, alloc, opt, importance, batches = _moving_run()
    layers = lorambo.lora_layers(model)
    events = []
    for step, batch in enumerate(batches):
        _train_step(model, alloc, step, batch, importance)
        before = importance.state_dict()
        ids_before = {n: slot_ids(layer) for n, layer in layers.items()}
        records = alloc.step(step, opt, component_scores=importance.component_scores())
        importance.follow(records)
        events += [r["event"] for r in records]
        after = importance.state_dict()
        for name, layer in layers.items():
            old_ids = ids_before[name]
            for slot, cid in enumerate(slot_ids(layer)):
                # a component that was there keeps its numbers, in whichever slot it is now;
                # a new one (grown) and an empty slot start from zero
                was = old_ids.index(cid) if cid >= 0 and cid in old_ids else None
                for key, dim in (((name, "A"), 0), ((name, "B"), 1)):
                    for table in ("ibar", "ubar"):
                        got = after[table][key].select(dim, slot)
                        want = (before[table][key].select(dim, was) if was is not None
                                else torch.zeros_like(got))
                        torch.testing.assert_close(got, want, rtol=0, atol=0)
        opt.step()
        opt.zero_grad()
    assert "shrink" in events and "grow" in events  # moves happened, both ways
    scores = importance.component_scores()
    # a layer whose every component was moved away (rank 0) has no scores; the others keep theirs
    assert any(s.numel() for s in scores.values())
    assert all(float(s.abs().sum()) > 0 for s in scores.values() if s.numel())


def test_without_follow_the_next_update_names_the_moved_layer():
    model, alloc, opt, importance, batches = _moving_run()
    for step, batch in enumerate(batches[:2]):
        _train_step(model, alloc, step, batch, importance)
        records = alloc.step(step, opt, component_scores=importance.component_scores())
        assert records
        opt.step()
        opt.zero_grad()
        if step == 1:
            break
        importance.follow(records)
    with pytest.raises(RuntimeError, match=r"slots of layer '\d' .* importance.keep"):
        importance.component_scores()


def test_bad_records_are_refused_before_any_is_applied():
    model, alloc, opt, importance, batches = _moving_run()
    _train_step(model, alloc, 0, batches[0], importance)
    before = importance.state_dict()
    grow = {"event": "grow", "layer": "0", "old_rank": 0, "new_rank": 2}
    for bad, message in (({"event": "rename", "layer": "0"}, r"records\[1\] = .* is not a rank change"),
                         ({"event": "grow", "layer": "9", "old_rank": 0, "new_rank": 1}, "unknown layer '9'"),
                         ({"event": "grow", "layer": "0", "old_rank": 7, "new_rank": 9},
                          r"follow slots \[8\] outside \[0, capacity = 8\)"),
                         ("grow", r"records\[1\] = 'grow' is not a rank change")):
        with pytest.raises(ValueError, match=message):
            importance.follow([grow, bad])
        after = importance.state_dict()  # the valid first record was not applied either
        for table in ("ibar", "ubar"):
            assert all(torch.equal(after[table][k], v) for k, v in before[table].items())
    with pytest.raises(TypeError, match="takes a list of decision records, got one record"):
        importance.follow(grow)
