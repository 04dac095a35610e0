"""What a peft user expects of the model API: modules_to_save, alpha_pattern, parameter counts, disable_adapter."""

import copy

import pytest
import torch
from torch import nn
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import BertConfig, BertForSequenceClassification

import lorambo
from lorambo import configure_model, disable_adapter, load_adapter, lora_layers, save_adapter, trainable_parameters
from lorambo.model.modules_to_save import modules_to_save

DT = torch.float64
RANKS = {"bert.encoder.layer.0.attention.self.query": 2, "bert.encoder.layer.0.attention.self.value": 6,
         "bert.encoder.layer.1.intermediate.dense": 3, "bert.encoder.layer.1.output.dense": 5}


def _bert(seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(DT).eval()


def _ids(seed=1):
    return torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(seed))


def _train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=0.05)
    labels = torch.tensor([0, 2, 1])
    for step in range(steps):
        loss = torch.nn.functional.cross_entropy(model(input_ids=_ids(step)).logits, labels)
        loss.backward()
        opt.step()
        opt.zero_grad()


def test_modules_to_save_train_and_round_trip(tmp_path):
    base = _bert()
    model = configure_model(copy.deepcopy(base), RANKS, modules_to_save=["classifier"])
    assert modules_to_save(model) == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n or n.startswith("classifier.")}
    configure_model(model, {n: r + 1 for n, r in RANKS.items()})  # re-ranking keeps the head trainable
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    head_before = model.classifier.weight.detach().clone()
    _train(model)
    assert not torch.equal(model.classifier.weight, head_before)
    save_adapter(model, tmp_path)

    for target in (_bert(), configure_model(_bert(), {n: 1 for n in RANKS}, capacity=8)):
        reloaded = load_adapter(target, tmp_path)
        torch.testing.assert_close(reloaded(input_ids=_ids(9)).logits, model(input_ids=_ids(9)).logits,
                                   rtol=0, atol=1e-12)
        assert modules_to_save(reloaded) == ["classifier"]
        assert reloaded.classifier.weight.requires_grad

    lorambo.unload(model, merge=False)
    assert all(p.requires_grad for p in model.parameters()) and modules_to_save(model) == []


def test_modules_to_save_errors_leave_model_untouched():
    model = _bert()
    with pytest.raises(ValueError, match="'classifer' matches no module"):
        configure_model(model, RANKS, modules_to_save=["classifer"])
    with pytest.raises(ValueError, match="both in modules_to_save and a LoRA target"):
        configure_model(model, RANKS, modules_to_save=["bert.encoder.layer.0.attention.self.query"])
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_a_module_to_save_from_an_earlier_call_is_not_made_a_lora_target(tmp_path):
    """It was wrapped (base weight trainable, pools stored twice) and save_adapter then failed
    inside safetensors on tensors that share memory."""
    model = configure_model(_bert(), RANKS, modules_to_save=["classifier"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="'classifier' is both in modules_to_save and a LoRA target"):
        configure_model(model, 2, target_modules=["query", "classifier"])
    assert list(lora_layers(model)) == list(RANKS) and modules_to_save(model) == ["classifier"]
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    save_adapter(model, tmp_path)


def test_alpha_pattern_matches_peft():
    names = ["query", "value", "intermediate.dense"]
    pattern = {"layer.1.attention.self.value": 12.0, "value": 3.0, "intermediate.dense": 20}
    ours = configure_model(_bert(), 4, target_modules=names, alpha=8.0, alpha_pattern=pattern)
    theirs = get_peft_model(_bert(), LoraConfig(r=4, lora_alpha=8.0, target_modules=names, alpha_pattern=pattern))
    peft_scaling = {n: m.scaling["default"] for n, m in theirs.get_base_model().named_modules()
                    if isinstance(m, LoraLayer)}
    ours_scaling = {n: m.scaling for n, m in lora_layers(ours).items()}
    assert ours_scaling == pytest.approx(peft_scaling, rel=1e-15)
    assert ours_scaling["bert.encoder.layer.1.attention.self.value"] == 3.0  # first matching key wins
    assert ours_scaling["bert.encoder.layer.0.attention.self.value"] == 0.75
    assert ours_scaling["bert.encoder.layer.0.attention.self.query"] == 2.0
    with pytest.raises(ValueError, match="alpha_pattern key 'nothing' matches none"):
        configure_model(_bert(), 4, alpha_pattern={"nothing": 2.0})
    with pytest.raises(ValueError, match=r"alpha_pattern\['query'\] = -1"):
        configure_model(_bert(), 4, alpha_pattern={"query": -1})


def test_trainable_parameters_match_peft_and_report_capacity(capsys):
    ours = configure_model(_bert(), RANKS, capacity=16, modules_to_save=["classifier"])
    theirs = get_peft_model(_bert(), lorambo.peft_config(RANKS, modules_to_save=["classifier"]))
    peft_trainable, peft_all = theirs.get_nb_trainable_parameters()
    counts = trainable_parameters(ours)
    head = sum(p.numel() for p in ours.classifier.parameters())
    active = sum(r * (lora_layers(ours)[n].in_features + lora_layers(ours)[n].out_features) for n, r in RANKS.items())
    assert counts["lora_active"] == active and counts["other_trainable"] == head
    assert counts["trainable"] == peft_trainable == active + head
    assert counts["lora_capacity"] == sum(16 * (m.in_features + m.out_features) for m in lora_layers(ours).values())
    # peft's total also counts its frozen copy of the original head
    assert counts["all"] == peft_all - head
    assert counts["trainable_percent"] == pytest.approx(100 * (active + head) / (peft_all - head), rel=1e-12)
    # transformers counts tensor elements, every slot (docs/interop.md)
    assert ours.num_parameters(only_trainable=True) == counts["lora_capacity"] + head
    lorambo.print_trainable_parameters(ours)
    out = capsys.readouterr().out
    assert f"trainable params: {active + head:,}" in out and f"LoRA pool capacity: {counts['lora_capacity']:,}" in out
    assert f"trainable%: {100 * (active + head) / (peft_all - head):.4f}" in out


def test_trainable_parameters_of_a_model_without_parameters():
    # all params 0: the percentage is 0, not a ZeroDivisionError
    counts = trainable_parameters(nn.Sequential(nn.ReLU()))
    assert counts == {"trainable": 0, "all": 0, "trainable_percent": 0.0, "lora_active": 0, "lora_capacity": 0,
                      "other_trainable": 0}


def test_trainable_parameters_count_each_pool_by_its_requires_grad():
    # LoRA-FA freezes A and trains B; the count took a layer's pools as frozen or trained
    # together by lora_A alone: 0 of that layer's B counted, and all of a frozen B
    ours = configure_model(_bert(), RANKS)
    theirs = get_peft_model(_bert(), lorambo.peft_config(RANKS))
    query, value = "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.value"
    for model, a, b in ((ours, ".lora_A", ".lora_B"), (theirs, ".lora_A.default.weight", ".lora_B.default.weight")):
        for name, param in model.named_parameters():
            if name.endswith(a) and query in name or name.endswith(b) and value in name:
                param.requires_grad_(False)
    peft_trainable, _ = theirs.get_nb_trainable_parameters()
    counts = trainable_parameters(ours)
    layers = lora_layers(ours)
    assert counts["trainable"] == counts["lora_active"] == peft_trainable
    assert peft_trainable == sum(r * (layers[n].in_features + layers[n].out_features) for n, r in RANKS.items()) \
        - 2 * 32 - 6 * 32  # query's A [2, 32] and value's B [32, 6] frozen


def test_disable_adapter_runs_frozen_base():
    base = _bert()
    model = configure_model(copy.deepcopy(base), RANKS, modules_to_save=["classifier"])
    _train(model)
    ids = _ids(5)
    adapted = model(input_ids=ids).logits.detach()
    with disable_adapter(model):
        out = model(input_ids=ids).logits
        torch.testing.assert_close(out, base(input_ids=ids).logits, rtol=0, atol=1e-12)
        assert not out.requires_grad  # no LoRA branch, frozen head: nothing to train in there
        with pytest.raises(RuntimeError, match="do not nest"):
            with disable_adapter(model):
                pass
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=0)
    with pytest.raises(ZeroDivisionError):
        with disable_adapter(model):
            1 / 0
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=0)
    next(iter(lora_layers(model).values())).merge()
    with pytest.raises(RuntimeError, match="merged"):
        with disable_adapter(model):
            pass


def test_merging_inside_disable_adapter_is_refused():
    """The disabled forward runs the base layer alone; a merge inside the block put the adapter
    into that base weight, so the 'base model' computed the adapted one without a word."""
    base = _bert()
    model = configure_model(copy.deepcopy(base), RANKS)
    _train(model)
    ids = _ids(5)
    adapted = model(input_ids=ids).logits.detach()
    weights = {n: layer.base_layer.weight.clone() for n, layer in lora_layers(model).items()}
    with disable_adapter(model):
        layer = next(iter(lora_layers(model).values()))
        with pytest.raises(RuntimeError, match="inside lorambo.disable_adapter"):
            layer.merge()
        with pytest.raises(RuntimeError, match="inside lorambo.disable_adapter"):
            lorambo.unload(model, merge=True)
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-12)
    assert not any(layer.merged for layer in lora_layers(model).values())
    for name, layer in lora_layers(model).items():
        assert torch.equal(layer.base_layer.weight, weights[name])
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=0)
    layer.merge()  # after the block it merges as usual
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=1e-12, atol=1e-12)


def test_disable_adapter_keeps_forward_hooks_of_accelerate():
    """accelerate's hooks (device_map / offloading) replace forward on the instance. disable_adapter
    shadowed forward the same way, so it refused such layers as 'already active', and would have
    dropped the hook on exit."""
    hooks = pytest.importorskip("accelerate.hooks")

    class Count(hooks.ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    base = _bert()
    model = configure_model(copy.deepcopy(base), RANKS)
    _train(model)
    layers = list(lora_layers(model).values())
    for layer in layers:
        hooks.add_hook_to_module(layer, Count())
    ids = _ids(5)
    adapted = model(input_ids=ids).logits.detach()
    assert Count.calls == len(layers)
    with disable_adapter(model):
        torch.testing.assert_close(model(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-12)
    assert Count.calls == 2 * len(layers)
    torch.testing.assert_close(model(input_ids=ids).logits, adapted, rtol=0, atol=0)
    assert Count.calls == 3 * len(layers)


def test_printed_active_count_says_it_leaves_frozen_pools_out(capsys):
    # LoRA-FA: query's A [2, 32] frozen. The line printed "(N active)" with N = rank * out for that
    # layer, though all rank * (in + out) of its parameters are active: now it names what it counts
    model = configure_model(_bert(), RANKS, capacity=8)
    layers = lora_layers(model)
    layers["bert.encoder.layer.0.attention.self.query"].lora_A.requires_grad_(False)
    lorambo.print_trainable_parameters(model)
    out = capsys.readouterr().out
    trained = sum(r * (layers[n].in_features + layers[n].out_features) for n, r in RANKS.items()) - 2 * 32
    capacity = sum(8 * (m.in_features + m.out_features) for m in layers.values())
    assert f"LoRA pool capacity: {capacity:,} ({trained:,} active and trainable)" in out
