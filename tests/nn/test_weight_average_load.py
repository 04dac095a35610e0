"""A weight average (torch.optim.swa_utils.AveragedModel, an EMA) copied before a rank change keeps
the old rank and averages the grown slots into its inactive ones. Loading its state_dict, which
would bring back the old rank and zero those slots silently, is refused naming the layer, the
pool and the ranks, before anything changes. An average taken after the last rank change loads
as the average a float64 EMA computed by hand gives."""

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lorambo
from lorambo import LoRAMBoLinear

DT = torch.float64
DECAY = 0.9

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    return nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=4, name="fc"))


def _train(model, optimizer, average, steps, gen, by_hand=None):
    for _ in range(steps):
        model(torch.randn(8, 6, generator=gen, dtype=DT)).pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        average.update_parameters(model)
        if by_hand is not None:  # EMA: the first update copies, later ones blend
            for name, value in model.state_dict().items():
                if name.endswith("lora_A") or name.endswith("lora_B"):
                    old = by_hand.get(name)
                    by_hand[name] = value.clone() if old is None else DECAY * old + (1 - DECAY) * value


def _stale_average(steps_before_growth=1):
    """(model, EMA): the EMA copied at rank 2, trained ``steps_before_growth`` steps, the model's
    layer '0' grown to rank 3 and both trained 2 more steps; the EMA keeps rank 2."""
    model = _model()
    optimizer = lorambo.optim.AdamW(model.parameters(), lr=0.1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    gen = torch.Generator().manual_seed(1)
    _train(model, optimizer, ema, steps_before_growth, gen)
    model[0].set_rank(3, optimizer=optimizer)
    _train(model, optimizer, ema, 2, gen)
    return model, ema


def test_an_average_copied_before_growth_is_refused_on_load():
    _, ema = _stale_average(steps_before_growth=2)
    assert ema.module[0].rank == 2 and ema.module[0].lora_A[2].abs().max() > 0.01  # the stale copy
    target = _model()
    target[0].set_rank(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"LoRAMBoLinear 'fc': state_dict entry '0.lora_A' has non-zero slots up "
                                         r"to 3 but its saved rank \('0._extra_state'\) is 2"):
        target.load_state_dict(ema.module.state_dict())
    assert target[0].rank == 1
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_an_average_taken_after_the_last_rank_change_loads():
    model = _model()
    optimizer = lorambo.optim.AdamW(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    _train(model, optimizer, AveragedModel(model), 2, gen)
    model[0].set_rank(3, optimizer=optimizer)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))  # copied at rank 3
    by_hand = {}
    _train(model, optimizer, ema, 3, gen, by_hand)
    target = _model()
    target.load_state_dict(ema.module.state_dict())
    assert target[0].rank == 3
    for name, value in by_hand.items():
        torch.testing.assert_close(target.state_dict()[name], value, rtol=1e-12, atol=1e-14, msg=name)
    x = torch.randn(4, 6, generator=gen, dtype=DT)
    pools = {k.split(".")[-1]: v for k, v in by_hand.items()}
    want = x @ target[0].weight.T + target[0].bias + target[0].scaling * (x @ pools["lora_A"][:3].T) @ pools["lora_B"][:, :3].T
    torch.testing.assert_close(target(x), want, rtol=1e-12, atol=1e-12)


def test_follow_ranks_keeps_each_components_average_across_growth_moves_and_shrinking():
    """Reference: a float64 EMA kept by hand per component (a label the test moves with each
    edit); a component the average has not seen starts at the model's value."""
    from lorambo.model.averages import follow_ranks
    from lorambo.nn import keep_components_many

    model = _model()
    layer = model[0]
    optimizer = lorambo.optim.AdamW(model.parameters(), lr=0.1)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY))
    gen = torch.Generator().manual_seed(1)
    labels = ["c0", "c1"]  # the component in each active slot of the model
    by_hand = {}

    def update():
        for slot, label in enumerate(labels):
            row, col = layer.lora_A[slot].detach().clone(), layer.lora_B[:, slot].detach().clone()
            old = by_hand.get(label)
            by_hand[label] = (row, col) if old is None else (DECAY * old[0] + (1 - DECAY) * row,
                                                             DECAY * old[1] + (1 - DECAY) * col)

    def train(steps):
        for _ in range(steps):
            model(torch.randn(8, 6, generator=gen, dtype=DT)).pow(2).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            ema.update_parameters(model)
            update()

    train(2)
    layer.set_rank(4, optimizer=optimizer)  # growth: c2, c3 start now
    labels += ["c2", "c3"]
    assert follow_ranks(ema, model) == ["0"]
    for slot in (2, 3):
        by_hand[labels[slot]] = (layer.lora_A[slot].detach().clone(), layer.lora_B[:, slot].detach().clone())
    train(2)
    layer.keep_components([3, 0, 2], optimizer=optimizer)  # a move: c1 dropped, the others reordered
    labels = ["c3", "c0", "c2"]
    follow_ranks(ema, model)
    assert follow_ranks(ema, model) == []  # nothing left to follow
    train(1)
    keep_components_many([(layer, [1, 2])], optimizer=optimizer)  # the compiled remap path when built
    labels = ["c0", "c2"]
    follow_ranks(ema.module, model)
    train(2)
    average = ema.module[0]
    assert average.rank == layer.rank == 2
    for slot, label in enumerate(labels):
        torch.testing.assert_close(average.lora_A[slot], by_hand[label][0], rtol=1e-12, atol=1e-14, msg=label)
        torch.testing.assert_close(average.lora_B[:, slot], by_hand[label][1], rtol=1e-12, atol=1e-14, msg=label)
    assert not average.lora_A[2:].any() and not average.lora_B[:, 2:].any()
    target = _model()
    target.load_state_dict(ema.module.state_dict())  # loads: nothing past the rank
    assert target[0].rank == 2


def test_follow_ranks_refuses_an_average_of_another_model_before_any_change():
    from lorambo.model.averages import follow_ranks

    model = _model()
    other = nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=3, name="fc"))
    average = AveragedModel(model)
    model[0].set_rank(3)
    with pytest.raises(ValueError, match=r"follow_ranks: layer '0' has pools \[3, 6\] / \[5, 3\] in the average, "
                                         r"\[4, 6\] / \[5, 4\] in the model"):
        follow_ranks(other, model)
    with pytest.raises(TypeError, match=r"model is an AveragedModel; pass the trained model second"):
        follow_ranks(model, average)
    two = nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=4, name="fc"),
                        LoRAMBoLinear(nn.Linear(5, 5, dtype=DT), 2, capacity=4, name="fc2"))
    with pytest.raises(ValueError, match=r"follow_ranks: the average has LoRA layers \['0', '1'\], the model \['0'\]"):
        follow_ranks(two, model)
    assert other[0].rank == 2 and average.module[0].rank == 2 and two[0].rank == 2
    for merged, where in ((model[0], "model"), (average.module[0], "average")):
        merged.merge()
        with pytest.raises(ValueError, match=rf"follow_ranks: layer '0' is merged in the {where}; unmerge\(\) it first"):
            follow_ranks(average, model)
        merged.unmerge()
        assert average.module[0].rank == 2


def test_follow_ranks_refuses_a_sharded_pool_before_any_change(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from lorambo.model.averages import follow_ranks

    model = _model()
    average = AveragedModel(model)
    model[0].set_rank(3)
    mesh = init_device_mesh("cpu", (1,))
    model[0].lora_A = nn.Parameter(distribute_tensor(model[0].lora_A.detach(), mesh, [Shard(0)]))  # one pool of four
    with pytest.raises(ValueError, match=r"follow_ranks: layer '0' has sharded pools \(FSDP2\)"):
        follow_ranks(average, model)
    assert average.module[0].rank == 2


def test_follow_ranks_after_the_model_loads_other_pools_restarts_the_average():
    from lorambo.model.averages import follow_ranks

    model = _model()
    average = AveragedModel(model)
    other = nn.Sequential(LoRAMBoLinear(nn.Linear(6, 5, dtype=DT), 2, capacity=4, name="fc", alpha=6.0,
                                        use_rslora=True))
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():  # other components at another rank, with another alpha (rsLoRA)
        other[0].set_rank(3)
        other[0].lora_A[:3].normal_(generator=gen)
        other[0].lora_B[:, :3].normal_(generator=gen)
    model.load_state_dict(other.state_dict())
    assert follow_ranks(average, model) == ["0"]
    copy = average.module[0]
    assert copy.rank == 3 and (copy.alpha, copy.use_rslora) == (6.0, True)
    assert torch.equal(copy.lora_A, other[0].lora_A)
    assert torch.equal(copy.lora_B, other[0].lora_B)
    x = torch.randn(4, 6, generator=gen, dtype=DT)  # scaling alpha / sqrt(2), the rank other was made with
    expected = copy.base_layer(x) + 6.0 / 2 ** 0.5 * (x @ other[0].lora_A[:3].T) @ other[0].lora_B[:, :3].T
    torch.testing.assert_close(copy(x), expected, rtol=1e-12, atol=1e-12)


def test_follow_ranks_after_load_adapter_into_the_model_restarts_the_average(tmp_path):
    from lorambo.model.averages import follow_ranks

    model = _model()
    average = AveragedModel(model)
    other = _model()
    with torch.no_grad():  # other components at the same rank
        other[0].lora_A[:2].normal_(generator=torch.Generator().manual_seed(5))
        other[0].lora_B[:, :2].normal_(generator=torch.Generator().manual_seed(6))
    lorambo.save_adapter(other, tmp_path / "adapter")
    lorambo.load_adapter(model, tmp_path / "adapter")
    assert follow_ranks(average, model) == ["0"]
    assert torch.equal(average.module[0].lora_A, other[0].lora_A)
    assert torch.equal(average.module[0].lora_B, other[0].lora_B)


@pytest.mark.parametrize("save", ["save_adapter", "export_peft"])
def test_saving_a_stale_average_is_refused_and_a_followed_one_saves_whole(tmp_path, save):
    from lorambo.model.averages import follow_ranks

    model, ema = _stale_average()
    with pytest.raises(ValueError, match=rf"{save}: LoRAMBoLinear 'fc' has non-zero slots up to 3 but its rank is 2"):
        getattr(lorambo, save)(ema.module, tmp_path / "stale")
    assert not (tmp_path / "stale").exists()
    follow_ranks(ema, model)
    if save == "save_adapter":
        lorambo.save_adapter(ema.module, tmp_path / "adapter")
        loaded = lorambo.load_adapter(nn.Sequential(nn.Linear(6, 5, dtype=DT)), tmp_path / "adapter")
        assert loaded[0].rank == 3
        assert torch.equal(loaded[0].lora_A, ema.module[0].lora_A)
        assert torch.equal(loaded[0].lora_B, ema.module[0].lora_B)
    else:
        lorambo.export_peft(ema.module, tmp_path / "peft")


def test_a_load_starts_new_components_only_where_it_loads_the_pools():
    """Pools loaded without their saved ids are new components (new ids, one slot edit); a load
    of the base weight alone leaves the components, their ids and the edit count as they were."""
    from lorambo.nn.slot_lineage import slot_ids

    torch.manual_seed(0)
    layer = LoRAMBoLinear(nn.Linear(6, 5), rank=2, capacity=4)
    ids, edits = slot_ids(layer), layer.slot_edits
    layer.load_state_dict({"base_layer.weight": torch.randn(5, 6)}, strict=False)
    assert slot_ids(layer) == ids and layer.slot_edits == edits
    layer.load_state_dict({"lora_A": torch.randn(4, 6) * torch.tensor([1.0, 1, 0, 0])[:, None],
                           "lora_B": torch.randn(5, 4) * torch.tensor([1.0, 1, 0, 0])}, strict=False)
    new = slot_ids(layer)
    assert new[2:] == [-1, -1] and not set(new[:2]) & set(ids[:2]) and layer.slot_edits == edits + 1
