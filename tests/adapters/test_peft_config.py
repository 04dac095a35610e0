"""peft_config: a peft.LoraConfig whose patterns give peft lorambo's ranks and scalings."""

import copy

import pytest
import torch
from peft import get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertModel

import lorambo
from lorambo import configure_model, lora_layers, peft_config


def _bert():
    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)).double()


RANKS = {"encoder.layer.0.attention.self.query": 3, "encoder.layer.0.attention.self.value": 5,
         "encoder.layer.1.attention.self.query": 3, "encoder.layer.1.intermediate.dense": 7,
         "encoder.layer.1.output.dense": 0}


def _peft_layers(model):
    return {n: m for n, m in model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("kwargs", [{}, {"alpha": 4.0}, {"alpha": 6.0, "use_rslora": True},
                                    {"alpha": 2.0, "alpha_pattern": {"value": 9.0}}])
def test_peft_realises_lorambo_ranks_and_scaling(kwargs):
    base = _bert()
    ours = configure_model(copy.deepcopy(base), RANKS, **kwargs)
    theirs = get_peft_model(base, peft_config(RANKS, **kwargs))
    layers, peft_layers = lora_layers(ours), _peft_layers(theirs)
    assert set(peft_layers) == {n for n, r in RANKS.items() if r > 0}
    for name, layer in peft_layers.items():
        assert layer.r["default"] == RANKS[name]
        assert layer.scaling["default"] == pytest.approx(layers[name].scaling, rel=1e-15)
    # same weights -> same function (float64), and peft trains it
    with torch.no_grad():
        for name, layer in peft_layers.items():
            r = RANKS[name]
            layers[name].lora_B[:, :r].normal_(std=0.3)
            layer.lora_A["default"].weight.copy_(layers[name].lora_A[:r])
            layer.lora_B["default"].weight.copy_(layers[name].lora_B[:, :r])
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(theirs(input_ids=ids).last_hidden_state, ours(input_ids=ids).last_hidden_state,
                               rtol=1e-12, atol=1e-12)
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.02)
    target = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    losses = []
    for _ in range(3):
        loss = (theirs(input_ids=ids).last_hidden_state - target).pow(2).mean()
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[2] < losses[0], losses


def test_from_model_after_growth_keeps_construction_scaling():
    base = _bert()
    ours = configure_model(copy.deepcopy(base), {k: v for k, v in RANKS.items() if v}, capacity=8)
    lora_layers(ours)["encoder.layer.0.attention.self.query"].set_rank(6)
    theirs = get_peft_model(base, peft_config(ours))
    for name, layer in _peft_layers(theirs).items():
        ref = lora_layers(ours)[name]
        assert (layer.r["default"], layer.scaling["default"]) == (ref.rank, pytest.approx(ref.scaling, rel=1e-15))
    assert _peft_layers(theirs)["encoder.layer.0.attention.self.query"].scaling["default"] == pytest.approx(1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="every rank is 0"):
        peft_config({"a": 0})
    with pytest.raises(ValueError, match="rank of 'a'"):
        peft_config({"a": -1})
    with pytest.raises(ValueError, match="target_modules is set from the allocation"):
        peft_config({"a": 2}, target_modules=["a"])
    with pytest.raises(ValueError, match="from the model's layers"):
        peft_config(configure_model(_bert(), 2), alpha=3.0)
    assert lorambo.peft_config is peft_config


def test_numpy_integer_ranks_are_ranks():
    """configure_model takes numpy ints; peft_config refused them ('is np.int64(4): must be an int')."""
    np = pytest.importorskip("numpy")
    ranks = {"bert.encoder.layer.0.attention.self.query": 4, "bert.encoder.layer.1.attention.self.value": 2}
    got = peft_config({n: np.int64(r) for n, r in ranks.items()}).to_dict()
    assert got == peft_config(ranks).to_dict()
    assert all(type(r) is int for r in got["rank_pattern"].values()) and type(got["r"]) is int


@pytest.mark.parametrize("kwargs, layer", [
    ({"alpha": float("nan")}, "encoder.layer.0.attention.self.query"),
    ({"alpha": float("inf")}, "encoder.layer.0.attention.self.query"),
    ({"alpha": 8.0, "alpha_pattern": {"intermediate.dense": float("-inf")}}, "encoder.layer.1.intermediate.dense"),
])
def test_non_finite_alpha_is_refused_naming_the_layer(kwargs, layer):
    """configure_model refuses a non-finite alpha; peft_config gave peft a NaN/inf scaling (and an
    adapter_config.json with the non-JSON token NaN)."""
    with pytest.raises(ValueError, match=rf"alpha of '{layer}' is .*finite"):
        peft_config(RANKS, **kwargs)
    with pytest.raises(ValueError, match="finite"):
        configure_model(_bert(), RANKS, **kwargs)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))


def test_a_compiled_model_gives_the_plain_model_names():
    """peft_config(torch.compile(model)) targeted '_orig_mod.<name>', which peft finds in no plain model."""
    model = lorambo.configure_model(_net(), {"0": 2, "2": 3}, capacity=4)
    config = peft_config(torch.compile(model, backend="eager"))
    assert set(config.rank_pattern) == {"0", "2"} and config.rank_pattern == peft_config(model).rank_pattern
    peft_model = get_peft_model(_net(), config)
    assert {n for n, m in peft_model.named_modules() if hasattr(m, "lora_A")} == \
        {"base_model.model.0", "base_model.model.2"}
