"""A model and its weight average resumed from their checkpoints: the slot ids travel in the
state_dict's metadata, so after a load both hold the same ids and the first follow_ranks after
the next rank change keeps each component's average (with new ids in every slot it would replace
every layer's average by the model's values, also in layers whose ranks did not change)."""

import io

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import lorambo
from lorambo.model.averages import follow_ranks


def _build():
    return lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)).double(), 2, capacity=4)


def _trained():
    torch.manual_seed(0)
    model = _build()
    average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    for step in range(4):
        model(torch.randn(8, 6, generator=gen, dtype=torch.float64)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 1:  # a rank change before the save: ids that are not the build's
            lorambo.lora_layers(model)["1"].keep_components([1, 0])
            follow_ranks(average, model)
        average.update_parameters(model)
    return model, average


def _round_trip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def test_a_resumed_average_keeps_every_components_average_across_the_next_rank_change():
    model, average = _trained()
    saved_model, saved_average = _round_trip(model.state_dict()), _round_trip(average.state_dict())
    resumed = _build()
    resumed_average = AveragedModel(resumed, multi_avg_fn=get_ema_multi_avg_fn(0.8))
    resumed.load_state_dict(saved_model)
    resumed_average.load_state_dict(saved_average)

    layer = lorambo.lora_layers(resumed)["0"]
    layer.set_rank(3)  # a rank change in layer 0 only
    assert follow_ranks(resumed_average, resumed) == ["0"]
    for name in ("0", "1"):
        for pool in ("lora_A", "lora_B"):
            got = getattr(resumed_average.module[int(name)], pool).detach()
            want = saved_average[f"module.{name}.{pool}"].clone()
            if name == "0":  # the grown slot starts at the model's value (B: zero), the others keep their average
                if pool == "lora_A":
                    want[2] = layer.lora_A.detach()[2]
                else:
                    want[:, 2] = layer.lora_B.detach()[:, 2]
            assert torch.equal(got, want), (name, pool)


def test_a_state_dict_without_its_metadata_starts_new_components():
    model, average = _trained()
    resumed = _build()
    resumed_average = AveragedModel(resumed)
    resumed.load_state_dict(dict(model.state_dict()))  # a plain dict copy: no _metadata
    resumed_average.load_state_dict(dict(average.state_dict()))
    lorambo.lora_layers(resumed)["0"].set_rank(3)
    assert follow_ranks(resumed_average, resumed) == ["0", "1"]  # nothing tells the components apart
    assert torch.equal(resumed_average.module[1].lora_A, resumed[1].lora_A)


def test_components_started_after_a_load_get_ids_no_saved_component_has():
    """Ids saved by another process (here: far above this process's counter) are taken back by
    the load; a component grown afterwards must not reuse one of them."""
    from lorambo.nn.slot_lineage import SLOT_IDS_KEY, slot_ids

    torch.manual_seed(0)
    model = _build()
    state = model.state_dict()
    high = max(max(slot_ids(layer)) for layer in lorambo.lora_layers(model).values()) + 10 ** 6
    for name in ("0", "1"):
        ids = state._metadata[name][SLOT_IDS_KEY]
        state._metadata[name][SLOT_IDS_KEY] = [i + high if i >= 0 else -1 for i in ids]
    model.load_state_dict(state)
    loaded = {i for layer in lorambo.lora_layers(model).values() for i in slot_ids(layer) if i >= 0}
    assert min(loaded) >= high  # taken back, not started anew
    layer = lorambo.lora_layers(model)["0"]
    layer.set_rank(4)
    grown = slot_ids(layer)[2:4]
    assert all(i > max(loaded) for i in grown), (grown, max(loaded))


def test_seeded_runs_save_the_same_state_dict_bytes(tmp_path):
    """The ids in the state_dict come from a counter, not a random draw: two fresh processes
    running the same seeded script write byte-identical torch.save files."""
    import subprocess
    import sys

    script = ("import sys, torch; from torch import nn; import lorambo\n"
              "torch.manual_seed(0)\n"
              "model = lorambo.configure_model(nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 4)), 2, capacity=4)\n"
              "lorambo.lora_layers(model)['1'].keep_components([1, 0])\n"
              "lorambo.lora_layers(model)['0'].set_rank(3)\n"
              "torch.save(model.state_dict(), sys.argv[1])\n")
    files = [tmp_path / run / "state.pt" for run in ("first", "second")]  # torch.save's archive names the file
    for file in files:
        file.parent.mkdir()
    runs = [subprocess.Popen([sys.executable, "-c", script, str(file)]) for file in files]
    assert [run.wait(timeout=120) for run in runs] == [0, 0]
    assert files[0].read_bytes() == files[1].read_bytes()


def test_components_started_after_unpickling_get_ids_the_pickled_layer_does_not_hold():
    """A layer unpickled from another process (its ids far above this process's counter)."""
    import pickle

    from lorambo.nn.slot_lineage import slot_ids

    torch.manual_seed(0)
    layer = lorambo.lora_layers(_build())["0"]
    high = max(slot_ids(layer)) + 10 ** 6
    layer.__dict__["_slot_ids"] = [i + high if i >= 0 else -1 for i in slot_ids(layer)]  # as made elsewhere
    copy = pickle.loads(pickle.dumps(layer))
    copy.set_rank(4)
    assert all(i > high + 1 for i in slot_ids(copy)[2:4]), slot_ids(copy)
