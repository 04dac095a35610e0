"""lorambo on the model families users bring (tiny random configs, seeded): default and explicit
targets, outputs against the unmodified model and a plain-torch float64 reference with the
deltas merged by hand, rank changes, merge, training, peft in both directions and sensitivities."""

import copy
import math
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import lorambo
from lorambo import configure_model, export_peft, from_peft, import_peft, lora_layers, unload
from lorambo.model import default_targets
from lorambo.nn import LoRAMBoLinear
from lorambo.nn.base_layers import base_kind
from tests.model.arch_zoo import MOE, NAMES, build, dtype_of, logits

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def _tol(name):
    return dict(rtol=1e-10, atol=1e-10) if dtype_of(name) == torch.float64 else dict(rtol=1e-5, atol=1e-5)


def _configure_default(model, name):
    """configure_model(model, 2) with the default targets. Qwen2-MoE's shared_expert_gate has one
    output, so rank 2 is refused naming it; the same targets then take rank <= min(in, out)."""
    if name != "qwen2_moe":
        return configure_model(model, 2)
    with pytest.raises(ValueError, match=r"'model\.layers\.0\.mlp\.shared_expert_gate': rank 2 exceeds "
                                         r"min\(in, out\) = 1 of this 32 -> 1 layer"):
        configure_model(model, 2)
    assert not lora_layers(model)
    ranks = {}
    for n in default_targets(model):
        m = model.get_submodule(n)
        ranks[n] = min(2, m.in_features, m.out_features)
    return configure_model(model, ranks, capacity={n: min(4, max(r, 1) * 2) if r > 1 else 1
                                                    for n, r in ranks.items()})


def _randomise(model, seed=7):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            r = layer.rank
            layer.lora_A[:r].copy_(torch.randn(layer.lora_A[:r].shape, generator=g) * 0.3)
            layer.lora_B[:, :r].copy_(torch.randn(layer.lora_B[:, :r].shape, generator=g) * 0.3)


@torch.no_grad()
def _reference(base, adapted):
    """``base`` with each adapter's active delta ``s B A`` added to its weight, in float64 plain
    torch (Conv1D stores [in, out])."""
    ref = copy.deepcopy(base)
    for name, layer in lora_layers(adapted).items():
        r = layer.rank
        delta = layer.scaling * (layer.lora_B[:, :r].double() @ layer.lora_A[:r].double())
        weight = ref.get_submodule(name).weight
        weight += (delta if layer.base_kind == "linear" else delta.t()).to(weight.dtype)
    return ref


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_outputs_rank_changes_and_merge(name):
    base, batch = build(name)
    y0 = logits(base, batch)
    model = copy.deepcopy(base)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _configure_default(model, name)
    stacked = [w for w in caught if "stacked 3-D weights" in str(w.message)]
    assert len(stacked) == (1 if name in MOE else 0)  # fused experts are left out, and said so
    layers = lora_layers(model)
    assert layers and all(base_kind(l.base_layer) for l in layers.values())
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    assert all(l.base_layer is not head for l in layers.values())  # the output layer is never a default target
    assert not any(n.rsplit(".", 1)[-1] in ("classifier", "lm_head", "experts") for n in layers)
    torch.testing.assert_close(logits(model, batch), y0, **_tol(name))  # B = 0: the base model's outputs

    _randomise(model)
    y1 = logits(model, batch)
    assert (y1 - y0).abs().max() > 1e-3
    torch.testing.assert_close(y1, logits(_reference(base, model), batch), **_tol(name))

    grown, shrunk = [l for l in layers.values() if l.rank < l.capacity][:2], list(layers.values())[-1]
    assert grown
    for layer in grown:  # new slots start at B = 0: same function
        layer.set_rank(layer.rank + 1)
    torch.testing.assert_close(logits(model, batch), y1, **_tol(name))
    shrunk.set_rank(shrunk.rank - 1)  # a rank moved out of the last layer: its top slot leaves
    y2 = logits(model, batch)
    torch.testing.assert_close(y2, logits(_reference(base, model), batch), **_tol(name))

    merged = unload(copy.deepcopy(model), merge=True)
    assert not any(isinstance(m, LoRAMBoLinear) for m in merged.modules())
    assert all(p.requires_grad for p in merged.parameters())
    torch.testing.assert_close(logits(merged, batch), y2, **_tol(name))


def _explicit_targets(model):
    """Two leaf names of the default targets that name no other Linear (a list, suffix-matched:
    MobileBERT's "dense" also names its LM head's bypassed dense) and one full name (regex)."""
    defaults = default_targets(model)
    others = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if base_kind(m) and n not in defaults}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in defaults} - others)
    return leaves[:2], defaults[0]


@pytest.mark.parametrize("name", NAMES)
def test_explicit_targets_train(name):
    base, batch = build(name)
    leaves, full = _explicit_targets(base)
    regex = copy.deepcopy(base)
    configure_model(regex, 2, target_modules=full.replace(".", r"\."))
    assert list(lora_layers(regex)) == [full]

    model = configure_model(copy.deepcopy(base), 2, target_modules=leaves)
    expected = [n for n, m in base.named_modules() if base_kind(m) and n.rsplit(".", 1)[-1] in leaves]
    assert list(lora_layers(model)) == expected
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{x}" for n in expected for x in "AB"}

    target = torch.randn(logits(base, batch).shape, generator=torch.Generator().manual_seed(3),
                         dtype=dtype_of(name))
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = (logits(model, batch) - target).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("name", NAMES)
def test_peft_export_import_and_from_peft(name, tmp_path):
    base, batch = build(name)
    leaves, _ = _explicit_targets(base)
    model = configure_model(copy.deepcopy(base), 3, target_modules=leaves, alpha=5.0)
    _randomise(model, seed=11)
    for layer in list(lora_layers(model).values())[:1]:
        layer.set_rank(2)  # per-layer ranks travel in rank_pattern
    expected = logits(_reference(base, model), batch)

    export_peft(model, tmp_path / "peft")
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft").eval()
    torch.testing.assert_close(logits(loaded, batch), expected, **_tol(name))
    imported = import_peft(copy.deepcopy(base), tmp_path / "peft")
    torch.testing.assert_close(logits(imported, batch), expected, **_tol(name))

    torch.manual_seed(5)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=leaves,
                                                                init_lora_weights=False)).eval()
    from_lora_config = logits(peft_model, batch)
    converted = from_peft(peft_model)
    assert set(lora_layers(converted)) == set(lora_layers(model))
    torch.testing.assert_close(logits(converted, batch), from_lora_config, **_tol(name))


@pytest.mark.parametrize("name", NAMES)
def test_sensitivities_run(name):
    base, batch = build(name)

    def loss_fn(m, b):
        return logits(m, b).square().mean()

    plain = lorambo.sensitivity.gradient_sensitivity(base, loss_fn, [batch])
    assert list(plain) == default_targets(base)
    model = configure_model(copy.deepcopy(base), 2, target_modules=_explicit_targets(base)[0])
    for estimate in (lorambo.sensitivity.gradient_sensitivity(model, loss_fn, [batch]),
                     lorambo.sensitivity.hessian_trace(model, loss_fn, [batch], num_probes=2)):
        assert list(estimate) == list(lora_layers(model))
        values = [v.value if isinstance(v, lorambo.sensitivity.Estimate) else float(v) for v in estimate.values()]
        assert all(math.isfinite(v) for v in values) and any(v != 0 for v in values)


@pytest.mark.parametrize("name", MOE)
def test_fused_experts_are_refused_naming_them(name):
    """transformers 5 stores a MoE layer's experts as stacked 3-D parameters of one module, which
    lorambo cannot adapt. Naming them is an error that says so, and the model is left as it was;
    the default targets leave them out with a warning (test above)."""
    model, _ = build(name)
    cls = type(model.get_submodule("model.layers.0.mlp.experts")).__name__
    cases = [(["experts"], TypeError, rf"'model\.layers\.0\.mlp\.experts' \({cls}\) matches target_modules entry "
                                      r"'experts' but cannot be adapted: .*stacked 3-D parameters \(gate_up_proj \[4, "),
             (["gate_up_proj"], ValueError, rf"entry 'gate_up_proj' matches no module .* parameters of "
                                            rf"'model\.layers\.0\.mlp\.experts' \({cls}\).*fused MoE experts"),
             (r".*experts\.down_proj", ValueError, r"regex .* matches no module .*fused MoE experts")]
    for targets, error, message in cases:
        with pytest.raises(error, match=message):
            configure_model(model, 2, target_modules=targets)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())

    # LoRAMBoOptimizer measures and allocates over the default targets too, and says so
    with pytest.warns(UserWarning, match=rf"modules of {type(model).__name__} hold stacked 3-D weights "
                                         rf"\(fused MoE experts: 'model\.layers\.0\.mlp\.experts' \({cls}\)"):
        lorambo.LoRAMBoOptimizer(model, total_budget=1000, sensitivity_method="gradient")

    with pytest.raises(ValueError, match=r"unsupported peft LoRA feature\(s\) target_parameters="):
        from_peft(get_peft_model(copy.deepcopy(model), LoraConfig(r=2, target_parameters=["experts.down_proj"])))


@pytest.mark.parametrize("targets", [None, ["q_proj"], {"model.layers.0.self_attn.v_proj": 2}])
def test_a_model_wrapped_by_peft_is_refused(targets):
    """configure_model on a peft model put LoRA on peft's LoRA: the default targets took each
    peft layer's base_layer, lora_A.default and lora_B.default, and a named target left peft's
    adapter adding to lorambo's. It is refused, naming from_peft, and nothing changes."""
    base, batch = build("llama")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["q_proj", "o_proj"],
                                                                init_lora_weights=False)).eval()
    expected = logits(peft_model, batch)
    flags = [p.requires_grad for p in peft_model.parameters()]
    ranks, kwargs = (targets, {}) if isinstance(targets, dict) else (2, {"target_modules": targets})
    for model in (peft_model, peft_model.get_base_model()):
        with pytest.raises(ValueError, match=r"holds peft modules \(.*peft\.tuners\.lora\.layer\.Linear.*"
                                             r"lorambo\.from_peft"):
            configure_model(model, ranks, **kwargs)
    assert not lora_layers(peft_model) and [p.requires_grad for p in peft_model.parameters()] == flags
    torch.testing.assert_close(logits(peft_model, batch), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name,layer,parent", [("mobilebert", "cls.predictions.dense", "MobileBertLMPredictionHead"),
                                               ("mamba", "backbone.layers.0.mixer.dt_proj", "MambaMixer")])
def test_a_linear_whose_parent_reads_its_weight_is_left_out_and_refused(name, layer, parent):
    """MobileBERT's LM head multiplies by dense.weight, Mamba's mixer by dt_proj.weight: their
    LoRA never ran, so outputs ignored the adapter and merging changed them (by 1.7 on the tiny
    MobileBERT). They are left out of the default targets, and naming one is an error."""
    model, _ = build(name)
    assert layer not in default_targets(model)
    child = layer.rsplit(".", 1)[-1]
    for ranks, kwargs in (({layer: 2}, {}), (2, {"target_modules": layer.replace(".", r"\.")})):
        with pytest.raises(ValueError, match=rf"'{layer}' .* its parent, a {parent}, reads {child}\.weight directly"):
            configure_model(model, ranks, **kwargs)
        assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_a_model_whose_linears_all_have_their_own_forward_says_why():
    """Falcon's layers are FalconLinear, an nn.Linear subclass with a forward of its own, which
    lorambo does not wrap. The error said the model had no nn.Linear at all."""
    import transformers

    model = transformers.FalconForCausalLM(transformers.FalconConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                                                     num_attention_heads=4))
    with pytest.raises(ValueError, match=r"FalconForCausalLM has no nn.Linear / Conv1D module to adapt .*; its Linear "
                                         r"layers cannot be wrapped, e\.g\. 'transformer\.h\.0\.self_attention\."
                                         r"query_key_value': FalconLinear subclasses Linear with a forward of its own"):
        configure_model(model, 2)
