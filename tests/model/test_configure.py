"""configure_model / lora_layers / unload: targeting (peft semantics), freezing, errors."""

import copy

import pytest
import torch
from adapted_reference import assert_pool_grads_match, run_reference
from torch import nn

import lorambo
from lorambo import LoRAMBoLinear, configure_model, lora_layers, unload


def test_default_targets_every_linear_except_the_head(mlp):
    configure_model(mlp, 4)
    assert list(lora_layers(mlp)) == ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert isinstance(mlp.lm_head, nn.Linear)
    trainable = [n for n, p in mlp.named_parameters() if p.requires_grad]
    assert all(n.endswith((".lora_A", ".lora_B")) for n in trainable) and len(trainable) == 8


def test_list_is_a_suffix_match_and_string_a_regex_fullmatch(mlp):
    configure_model(mlp, 2, target_modules=["up"])
    assert list(lora_layers(mlp)) == ["blocks.0.up", "blocks.1.up"]
    configure_model(mlp, 3, target_modules=r"blocks\.1\.(up|down)")
    layers = lora_layers(mlp)
    assert list(layers) == ["blocks.0.up", "blocks.1.up", "blocks.1.down"]
    assert layers["blocks.1.up"].rank == 3 and layers["blocks.0.up"].rank == 2  # re-rank in place


def test_rank_dict_names_targets_and_sets_capacity(mlp):
    configure_model(mlp, {"blocks.0.up": 1, "blocks.1.down": 6}, capacity={"blocks.0.up": 2, "blocks.1.down": 8})
    layers = lora_layers(mlp)
    assert {n: (l.rank, l.capacity) for n, l in layers.items()} == {"blocks.0.up": (1, 2), "blocks.1.down": (6, 8)}
    assert layers["blocks.1.down"].name == "blocks.1.down"


def test_a_capacity_for_no_target_is_refused_before_anything_changes(mlp):
    # allocate and import_peft refuse such a key too; ignored, a misspelt name hides that its
    # layer got another capacity
    capacity = {"blocks.0.up": 2, "blocks.1.down": 8, "blocks.1.dwon": 4}
    with pytest.raises(ValueError, match=r"configure_model: capacity names \['blocks\.1\.dwon'\]"):
        configure_model(mlp, {"blocks.0.up": 1, "blocks.1.down": 6}, capacity=capacity)
    assert not lora_layers(mlp) and all(p.requires_grad for p in mlp.parameters())


def test_reconfigure_changes_rank_in_place(mlp):
    configure_model(mlp, 2, capacity=8)
    layer = mlp.blocks[0].up
    params = (layer.lora_A, layer.lora_B)
    configure_model(mlp, {"blocks.0.up": 7})
    assert mlp.blocks[0].up is layer and layer.rank == 7 and (layer.lora_A, layer.lora_B) == params


def test_unload_merges_and_restores_trainability(mlp):
    x = torch.randn(3, 8)
    configure_model(mlp, 3)
    with torch.no_grad():
        for layer in lora_layers(mlp).values():
            layer.lora_B[:, :3].normal_(std=0.1)
    y = mlp(x)
    unload(mlp)
    assert not lora_layers(mlp) and isinstance(mlp.blocks[0].up, nn.Linear)
    torch.testing.assert_close(mlp(x), y, rtol=1e-5, atol=1e-5)
    assert all(p.requires_grad for p in mlp.parameters())


def test_unload_without_merge_gives_back_the_original_function(mlp):
    x = torch.randn(3, 8)
    y0 = mlp(x)
    configure_model(mlp, 2)
    with torch.no_grad():
        mlp.blocks[0].up.lora_B.normal_()
    assert not torch.allclose(mlp(x), y0)
    unload(mlp, merge=False)
    assert torch.equal(mlp(x), y0)
    # a layer merged before: unload(merge=False) takes its adapter back out of the weight
    configure_model(mlp, 2)
    with torch.no_grad():
        mlp.blocks[0].up.lora_B.normal_()
    mlp.blocks[0].up.merge()
    assert not torch.allclose(mlp(x), y0)
    unload(mlp, merge=False)
    torch.testing.assert_close(mlp(x), y0, rtol=1e-5, atol=1e-5)


def test_backward_reaches_only_lora_with_the_reference_gradients(mlp):
    base64 = copy.deepcopy(mlp).double()
    configure_model(mlp, 2)
    with torch.no_grad():
        for layer in lora_layers(mlp).values():
            layer.lora_B.normal_()  # B = 0 would make every A gradient zero
    x = torch.randn(4, 8)
    mlp(x).sum().backward()
    assert all(p.grad is None for n, p in mlp.named_parameters() if "lora_" not in n)
    want, leaves = run_reference(base64, mlp, (x.double(),))
    want.sum().backward()
    assert_pool_grads_match(mlp, leaves, rtol=1e-5)


# ----------------------------------------------------------------------------- bad input
def test_pattern_matching_nothing(mlp):
    with pytest.raises(ValueError, match=r"entry 'uq' matches no module.*did you mean \['up'\]"):
        configure_model(mlp, 2, target_modules=["up", "uq"])
    with pytest.raises(ValueError, match=r"regex 'attn\.\*' matches no module"):
        configure_model(mlp, 2, target_modules="attn.*")
    assert not lora_layers(mlp)


def test_a_string_meant_as_a_suffix_says_to_pass_a_list(mlp):
    # before: only "target_modules regex 'up' matches no module of Net"
    with pytest.raises(ValueError, match=r"regex 'up' matches no module of Net; a string is a regex that must "
                                         r"match the whole dotted name \(peft's rule\), so it misses 'blocks\.0\.up': "
                                         r"for the modules whose names end in it pass a list, target_modules=\['up'\]"):
        configure_model(mlp, 2, target_modules="up")
    assert not lora_layers(mlp)


def test_plain_names_given_to_a_compiled_model_say_what_the_wrapper_calls_them(mlp):
    # before: "module 'blocks.0.up' not found in OptimizedModule", no word of the prefix
    compiled = torch.compile(mlp)  # wrapping compiles nothing yet
    with pytest.raises(ValueError, match=r"module 'blocks\.0\.up' not found in OptimizedModule \(a Net wrapped by "
                                         r"OptimizedModule, where it is '_orig_mod\.blocks\.0\.up'\): configure the "
                                         r"model before wrapping it"):
        configure_model(compiled, {"blocks.0.up": 2})
    assert not lora_layers(mlp)
    with pytest.raises(ValueError, match=r"module 'blocks\.0\.upp' not found in OptimizedModule; did you mean "
                                         r"\['_orig_mod\.blocks\.0\.up'"):  # no module it ends: no prefix to give
        configure_model(compiled, {"blocks.0.upp": 2})
    configure_model(compiled, {"_orig_mod.blocks.0.up": 2})  # the names the message gives
    assert list(lora_layers(mlp)) == ["blocks.0.up"]


def test_target_that_is_not_linear(mlp):
    with pytest.raises(TypeError, match=r"'blocks\.0' \(Block\).*not nn.Linear"):
        configure_model(mlp, 2, target_modules=r"blocks\.\d")
    with pytest.raises(TypeError, match=r"'norm' \(LayerNorm\)"):
        configure_model(mlp, {"norm": 2})


def test_unknown_name_and_bad_ranks(mlp):
    with pytest.raises(ValueError, match=r"'blocks\.0\.upp' not found.*blocks\.0\.up"):
        configure_model(mlp, {"blocks.0.upp": 2})
    with pytest.raises(TypeError, match="ranks must be an int"):
        configure_model(mlp, 2.0)
    with pytest.raises(ValueError, match="not both"):
        configure_model(mlp, {"blocks.0.up": 2}, target_modules=["up"])


def test_a_bad_layer_leaves_the_model_untouched(mlp):
    with pytest.raises(ValueError, match=r"'blocks\.1\.down'.*rank 9"):
        configure_model(mlp, {"blocks.0.up": 2, "blocks.1.down": 9}, capacity=8)
    assert not lora_layers(mlp)
    assert all(p.requires_grad for p in mlp.parameters())


def test_wrapping_existing_lora_layer_is_not_nested(mlp):
    base = mlp.blocks[0].up
    configure_model(mlp, 2, target_modules=["up"])
    configure_model(mlp, 3, target_modules=["up"])
    layer = lorambo.lora_layers(mlp)["blocks.0.up"]
    assert type(layer) is LoRAMBoLinear and layer.base_layer is base and layer.rank == 3


def test_an_int_rank_without_targets_re_ranks_the_existing_adapters_only(mlp):
    """``configure_model(model, r)`` on an adapted model re-ranks its adapters, as the README's
    "or re-ranks its adapters" says and as LoRAMBoOptimizer's default targets are the existing
    adapters. It adapted every other Linear as well (peft's all-linear): new pools, which the
    optimizer passed along did not hold, so they never trained and nothing said so."""
    configure_model(mlp, 2, target_modules=["up"], capacity=8)
    opt = torch.optim.Adam([p for p in mlp.parameters() if p.requires_grad], lr=1e-2)
    configure_model(mlp, 5, optimizer=opt)
    assert {n: m.rank for n, m in lora_layers(mlp).items()} == {"blocks.0.up": 5, "blocks.1.up": 5}
    assert isinstance(mlp.blocks[0].down, nn.Linear) and not mlp.blocks[0].down.weight.requires_grad
    held = {id(p) for group in opt.param_groups for p in group["params"]}
    assert held == {id(p) for p in mlp.parameters() if p.requires_grad}
    configure_model(mlp, 3, target_modules="all-linear")  # named: every Linear but the head
    assert {n: m.rank for n, m in lora_layers(mlp).items()} == {n: 3 for n in [
        "blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]}


def test_frozen_record_is_what_unload_reenables(mlp):
    from lorambo.model import frozen_by_lorambo

    assert frozen_by_lorambo(mlp) == []
    configure_model(mlp, 2, modules_to_save=["lm_head"])
    head = {id(p) for p in mlp.lm_head.parameters()}
    want = {id(p) for n, p in mlp.named_parameters() if not n.endswith((".lora_A", ".lora_B")) and id(p) not in head}
    got = frozen_by_lorambo(mlp)
    assert {id(p) for p in got} == want and len(got) == len(want)  # the head trains: not on the record
    assert not any(p.requires_grad for p in got) and all(p.requires_grad for p in mlp.lm_head.parameters())
    unload(mlp)
    assert frozen_by_lorambo(mlp) == [] and all(p.requires_grad for p in mlp.parameters())


@pytest.mark.parametrize("rebuild", ["to_empty", "assign"])
def test_unload_reenables_parameters_put_in_after_configure(mlp, rebuild):
    """to_empty (meta-device construction) and load_state_dict(assign=True) give the modules new
    Parameter objects; the record of what lorambo froze must follow them, so that unload makes
    the base model trainable again."""
    from lorambo.model import frozen_by_lorambo

    if rebuild == "to_empty":
        with torch.device("meta"):
            model = type(mlp)()
        configure_model(model, 2, modules_to_save=["lm_head"])
        model.to_empty(device="cpu")
    else:
        model = configure_model(mlp, 2, modules_to_save=["lm_head"])
        model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    head = {id(p) for p in model.lm_head.parameters()}
    want = {id(p) for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B")) and id(p) not in head}
    assert {id(p) for p in frozen_by_lorambo(model)} == want
    unload(model, merge=False)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == []


def test_a_recorded_parameter_set_to_none_after_configure_is_left_out(mlp):
    """A place on the record whose module now holds None (``module.bias = None``) names no
    parameter: the record lists the others and unload re-enables them."""
    from lorambo.model import frozen_by_lorambo

    configure_model(mlp, 2, target_modules=["up"])
    mlp.norm.bias = None
    got = frozen_by_lorambo(mlp)
    want = [p for n, p in mlp.named_parameters() if not n.endswith((".lora_A", ".lora_B"))]
    assert {id(p) for p in got} == {id(p) for p in want} and len(got) == len(want) and None not in got
    unload(mlp, merge=False)
    assert all(p.requires_grad for p in mlp.parameters()) and mlp.norm.bias is None


@pytest.mark.parametrize("kwargs,message", [
    ({"target_modules": 3}, "target_modules must be None, 'all-linear', a regex string or a list of module names"),
    ({"target_modules": ["up", 2]}, r"target_modules entries must be module names .*got 2 in \['up', 2\]"),
    ({"modules_to_save": 7}, "modules_to_save must be a module name or a list of them, got 7"),
])
def test_target_modules_and_modules_to_save_of_the_wrong_type(mlp, kwargs, message):
    """They failed inside Python ('int' object is not iterable, can only concatenate str)."""
    with pytest.raises(TypeError, match=message):
        configure_model(mlp, 2, **kwargs)
    assert not lora_layers(mlp) and all(p.requires_grad for p in mlp.parameters())


def test_a_ranks_dict_in_another_order_gives_the_same_adapters():
    """New layers draw A from torch's generator one after another: in the dict's order, a ranks
    dict read back sorted (a JSON file) gave each layer another layer's rows."""
    def built(names):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 7), nn.ReLU(), nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 4))
        torch.manual_seed(1)
        return configure_model(model, {n: 2 for n in names})

    in_order, reversed_order = built(["0", "2", "4"]), built(["4", "2", "0"])
    assert list(lora_layers(reversed_order)) == ["0", "2", "4"]
    bases = [nn.Linear(i, o) for i, o in ((6, 7), (7, 5), (5, 4))]
    torch.manual_seed(1)  # the model-order draw: one new layer after another
    want = [LoRAMBoLinear(base, rank=2).lora_A for base in bases]
    for (name, got), (_, ref), a in zip(lora_layers(reversed_order).items(), lora_layers(in_order).items(), want,
                                        strict=True):
        assert torch.equal(got.lora_A, ref.lora_A) and torch.equal(got.lora_A, a), name


@pytest.mark.parametrize("entry, error, message", [
    (2, TypeError, r"modules_to_save entries must be module names, got 2"),
    ("", TypeError, r"modules_to_save entries must be module names, got ''"),
    ("blocks.0.up", ValueError, r"entry 'blocks.0.up' matches module 'blocks.0.up', which is or contains a LoRA layer"),
    ("blocks.0", ValueError, r"entry 'blocks.0' matches module 'blocks.0', which is or contains a LoRA layer"),
    ("up.base_layer", ValueError, r"matches module 'blocks.0.up.base_layer', which is or contains a LoRA layer"),
    ("act", ValueError, r"entry 'act' matches module 'act', which has no parameters to train"),
])
def test_a_module_to_save_that_cannot_be_one_is_refused_by_name_and_nothing_changes(mlp, entry, error, message):
    """Checked against the model's LoRA layers already there (a second configure_model)."""
    mlp.act = nn.Tanh()  # a module without parameters
    configure_model(mlp, 2, target_modules=["up"])
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    grads = {n: p.requires_grad for n, p in mlp.named_parameters()}
    with pytest.raises(error, match=message):
        configure_model(mlp, 3, target_modules=["up"], modules_to_save=[entry])
    assert {n: p.requires_grad for n, p in mlp.named_parameters()} == grads
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
    assert {layer.rank for layer in lora_layers(mlp).values()} == {2}


def test_a_module_to_save_keeps_its_parameters_that_nothing_else_shares(mlp):
    """Only a parameter shared with the rest of the model gets a copy of its own: the head's
    others stay the same objects (an optimizer or a hook holding them keeps working)."""
    head = list(mlp.lm_head.parameters())
    configure_model(mlp, 2, target_modules=["up"], modules_to_save=["lm_head"])
    now = list(mlp.lm_head.parameters())
    assert len(now) == len(head) and all(a is b and a.requires_grad for a, b in zip(now, head))


@pytest.mark.parametrize("entry", ["blocks.0", "blocks.0.up"])
def test_a_module_to_save_that_is_or_holds_a_new_target_is_refused(mlp, entry):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    with pytest.raises(ValueError, match=rf"module '{entry}' is both in modules_to_save and a LoRA target "
                                         r"\('blocks.0.up'\)"):
        configure_model(mlp, 2, target_modules=["up"], modules_to_save=[entry])
    assert lora_layers(mlp) == {} and all(p.requires_grad for p in mlp.parameters())
    assert all(torch.equal(v, before[k]) for k, v in mlp.state_dict().items())
