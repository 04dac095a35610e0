"""import_peft / from_peft: peft LoRA adapters become LoRAMBoLinear pools computing what peft computes."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                          DistilBertForSequenceClassification, GPT2Config, GPT2LMHeadModel)

import lorambo
from lorambo import export_peft, from_peft, import_peft, lora_layers
from lorambo.adapters.peft_import import check_peft_config
from lorambo.model.modules_to_save import modules_to_save


def _bert(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


def _gpt2(dtype=torch.float64):
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def _randomise_peft(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.2)


BERT_CONFIG = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"],
                   rank_pattern={"layer.1.attention.self.query": 2, "intermediate.dense": 6},
                   alpha_pattern={"layer.0.attention.self.value": 3.0, "output.dense": 16},
                   modules_to_save=["classifier"], task_type="SEQ_CLS")
GPT2_CONFIG = dict(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], use_rslora=True,
                   rank_pattern={"h.1.mlp.c_fc": 5}, fan_in_fan_out=True)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(params=["bert", "gpt2"])
def saved_peft(request, tmp_path):
    build, cfg = (_bert, BERT_CONFIG) if request.param == "bert" else (_gpt2, GPT2_CONFIG)
    peft_model = get_peft_model(build(), LoraConfig(**cfg))
    _randomise_peft(peft_model, seed=len(request.param))
    peft_model.save_pretrained(tmp_path / "peft")
    return build, peft_model.eval(), tmp_path / "peft"


def test_import_matches_peft_outputs_and_patterns(saved_peft):
    build, peft_model, folder = saved_peft
    ours = import_peft(build(), folder)
    ids = torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(ours, ids), _logits(peft_model, ids), rtol=1e-12, atol=1e-12)

    from peft.tuners.lora import LoraLayer
    peft_layers = {n: m for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    layers = lora_layers(ours)
    assert set(layers) == set(peft_layers)
    for name, layer in layers.items():
        ref = peft_layers[name]
        assert layer.rank == ref.r["default"]
        assert layer.scaling == pytest.approx(ref.scaling["default"], rel=1e-15)
        assert layer.capacity >= min(2 * layer.rank, layer.in_features, layer.out_features)
        assert torch.equal(layer.lora_A[: layer.rank], ref.lora_A["default"].weight)
        assert torch.equal(layer.lora_B[:, : layer.rank], ref.lora_B["default"].weight)
        assert not layer.lora_A[layer.rank:].any() and not layer.lora_B[:, layer.rank:].any()
    if "classifier" in dict(ours.named_modules()):
        assert modules_to_save(ours) == ["classifier"]
        assert all(p.requires_grad for p in ours.classifier.parameters())
        assert not ours.bert.embeddings.word_embeddings.weight.requires_grad

    # room to grow: growth keeps the function (scaling fixed at import)
    before = _logits(ours, ids)
    for layer in layers.values():
        layer.set_rank(min(layer.rank + 1, layer.capacity))
    torch.testing.assert_close(_logits(ours, ids), before, rtol=1e-12, atol=1e-12)  # B = 0 in new slots


def test_round_trip_peft_lorambo_peft_fp32(saved_peft, tmp_path):
    build, peft_model, folder = saved_peft
    ours = import_peft(build(torch.float32), folder)
    export_peft(ours, tmp_path / "back")
    original = load_file(folder / "adapter_model.safetensors")
    back = load_file(tmp_path / "back/adapter_model.safetensors")
    lora_keys = {k for k in original if ".lora_" in k}
    assert lora_keys <= set(back)
    for key in lora_keys:
        assert (original[key].float() - back[key]).abs().max() <= 1e-6, key
    config = json.loads((tmp_path / "back/adapter_config.json").read_text())
    for name, layer in lora_layers(ours).items():  # the exported alpha reproduces peft's scaling
        assert config["alpha_pattern"][name] / config["rank_pattern"][name] == pytest.approx(layer.scaling, rel=1e-12)
    if "classifier" in dict(ours.named_modules()):  # the head travels as peft's modules_to_save
        assert config["modules_to_save"] == ["classifier"]
        for key in ("classifier.weight", "classifier.bias"):
            assert torch.equal(back[f"base_model.model.{key}"], original[f"base_model.model.{key}"].float())
    reloaded = PeftModel.from_pretrained(build(torch.float32), tmp_path / "back").eval()
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(4))
    reference = _logits(peft_model, ids)  # float64 peft
    assert (_logits(reloaded, ids).double() - reference).abs().max() <= 1e-5
    assert (_logits(ours, ids).double() - _logits(reloaded, ids).double()).abs().max() <= 1e-6


def _distilbert():
    torch.manual_seed(0)
    cfg = DistilBertConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, hidden_dim=48, max_position_embeddings=32,
                           num_labels=3, dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0)
    return DistilBertForSequenceClassification(cfg).to(torch.float64).eval()


def test_modules_to_save_are_the_ones_peft_matched(tmp_path):
    """peft matches modules_to_save entries with a plain ``endswith``: task_type SEQ_CLS's
    "classifier" also wraps DistilBERT's "pre_classifier", which peft trains and saves. The import
    refused such an adapter ("tensor 'pre_classifier.bias' is neither LoRA nor part of a module in
    modules_to_save")."""
    peft_model = get_peft_model(_distilbert(), LoraConfig(r=3, lora_alpha=6, target_modules=["q_lin", "v_lin"],
                                                           task_type="SEQ_CLS"))
    _randomise_peft(peft_model, seed=13)
    peft_model.save_pretrained(tmp_path / "peft")
    saved = load_file(tmp_path / "peft/adapter_model.safetensors")
    assert "base_model.model.pre_classifier.weight" in saved  # what peft saved: both heads
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(6))
    expected = _logits(peft_model.eval(), ids)

    ours = import_peft(_distilbert(), tmp_path / "peft")
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-12, atol=1e-12)
    assert modules_to_save(ours) == ["pre_classifier", "classifier"]
    for name in ("pre_classifier", "classifier"):
        for key, value in ours.get_submodule(name).state_dict().items():
            assert torch.equal(value, saved[f"base_model.model.{name}.{key}"]), (name, key)
        assert all(p.requires_grad for p in ours.get_submodule(name).parameters())
    with lorambo.disable_adapter(ours):
        torch.testing.assert_close(_logits(ours, ids), _logits(_distilbert(), ids), rtol=0, atol=0)

    export_peft(ours, tmp_path / "back")  # and peft reads it back
    reloaded = PeftModel.from_pretrained(_distilbert(), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-12, atol=1e-12)


def test_from_peft_converts_wrapped_model():
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    _randomise_peft(peft_model, seed=7)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = _logits(peft_model.eval(), ids)
    rng = torch.get_rng_state()
    model = from_peft(peft_model)
    assert torch.equal(torch.get_rng_state(), rng)
    assert type(model) is BertForSequenceClassification
    assert not any("peft" in type(m).__module__ for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-12, atol=1e-12)
    assert modules_to_save(model) == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n in dict(model.named_parameters()) if ".lora_" in n or n.startswith("classifier.")}
    # disable_adapter runs the base model: the classifier as it was before training, not peft's trained copy
    with lorambo.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), _logits(_bert(), ids), rtol=0, atol=0)


@pytest.mark.parametrize("chosen", ["default", "other"])
def test_from_peft_drops_the_other_adapters_of_a_multi_adapter_model(chosen):
    """Layers holding only another adapter ("default" on query while converting "other") stayed
    peft wrappers with that adapter active, so the converted model added it (logits off by ~5e-3)."""
    def two_adapters():
        peft_model = get_peft_model(_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"],
                                                        task_type="SEQ_CLS"))
        peft_model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["key", "value"],
                                                   modules_to_save=["classifier"]))
        _randomise_peft(peft_model, seed=11)
        return peft_model.eval()

    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    reference = two_adapters()
    reference.set_adapter(chosen)  # peft computing the chosen adapter alone
    expected = _logits(reference, ids)
    model = from_peft(two_adapters(), adapter_name=chosen)
    assert not any("peft" in type(m).__module__ for m in model.modules())
    targets = {"default": {"query", "value"}, "other": {"key", "value"}}[chosen]
    assert {n.rsplit(".", 1)[-1] for n in lora_layers(model)} == targets
    torch.testing.assert_close(_logits(model, ids), expected, rtol=1e-12, atol=1e-12)
    with lorambo.disable_adapter(model):
        torch.testing.assert_close(_logits(model, ids), _logits(_bert(), ids), rtol=0, atol=0)


def test_from_peft_with_several_active_adapters_asks_which():
    """peft adds up every active adapter; from_peft took the first one alone (logits off by ~0.5)."""
    peft_model = get_peft_model(_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    peft_model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["query", "value"]))
    _randomise_peft(peft_model, seed=12)
    peft_model.base_model.set_adapter(["default", "other"])
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = _logits(peft_model.eval(), ids)
    with pytest.raises(ValueError, match=r"several active adapters \['default', 'other'\].*adapter_name="):
        from_peft(peft_model)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0, atol=0)  # left as it was
    model = from_peft(peft_model, adapter_name="other")
    peft_alone = get_peft_model(_bert(), LoraConfig(r=2, lora_alpha=4, target_modules=["query"]))
    peft_alone.add_adapter("other", LoraConfig(r=3, lora_alpha=5, target_modules=["query", "value"]))
    _randomise_peft(peft_alone, seed=12)
    peft_alone.set_adapter("other")
    torch.testing.assert_close(_logits(model, ids), _logits(peft_alone.eval(), ids), rtol=1e-12, atol=1e-12)


def test_from_peft_that_fails_leaves_the_peft_model_working():
    """A failure after peft's wrappers were taken out (capacity 8.0 passed the range check, then
    LoRAMBoLinear refused it; a target used under two names) left the model with neither peft's
    adapter nor lorambo's: the trained adapter was gone."""
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    _randomise_peft(peft_model, seed=7)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = _logits(peft_model.eval(), ids)
    with pytest.raises(ValueError, match="capacity 8.0 of .* must be an int"):
        from_peft(peft_model, capacity=8.0)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0, atol=0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.c = self.b  # one module under two names: lorambo refuses it, peft adapts it at "b"

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    peft_model = get_peft_model(Net().double(), LoraConfig(r=2, target_modules=["a", "b"], init_lora_weights=False))
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = peft_model(x)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="used 2 times"):
        from_peft(peft_model)
    torch.testing.assert_close(peft_model(x), expected, rtol=0, atol=0)
    assert {n for n, p in peft_model.named_parameters() if p.requires_grad} == trainable


def test_capacity_for_a_module_the_adapter_does_not_adapt_is_refused(saved_peft):
    """A misspelt name in a {name: capacity} dict silently got the default capacity."""
    build, _, folder = saved_peft
    model = build()
    name = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    with pytest.raises(ValueError, match=r"^peft adapter .*: capacity names \['encoder.typo'\], which the adapter does not adapt"):
        import_peft(model, folder, capacity={"encoder.typo": 16})
    assert not lora_layers(model)
    with pytest.raises(ValueError, match="which the adapter does not adapt"):
        import_peft(model, folder, capacity={name + "x": 16})


def test_capacity_below_a_layers_rank_names_the_call(saved_peft):
    """The layer's own refusal ("rank 4 outside [0, capacity = 2]") named neither import_peft nor
    the capacity option."""
    build, _, folder = saved_peft
    model = build()
    with pytest.raises(ValueError, match=r"^peft adapter .*: capacity=1 for '.*' is below its rank \d+ in the adapter"):
        import_peft(model, folder, capacity=1)
    assert not lora_layers(model)


def test_a_capacity_per_module_sizes_that_pool_and_the_others_get_the_default(saved_peft):
    """Only a misspelt {name: capacity} entry was tested; the named pool's size was not."""
    from peft.tuners.lora import LoraLayer

    from lorambo.nn import default_capacity

    build, peft_model, folder = saved_peft
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(4))
    want = _logits(peft_model, ids)
    layers = {n: (m.r["default"], m.in_features, m.out_features)
              for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}
    name = sorted(layers)[0]
    rank, d_in, d_out = layers[name]
    assert default_capacity(rank, d_in, d_out) != rank + 1
    for convert in (lambda: import_peft(build(), folder, capacity={name: rank + 1}),
                    lambda: from_peft(peft_model, capacity={name: rank + 1})):
        ours = convert()
        got = {n: l.capacity for n, l in lora_layers(ours).items()}
        assert got == {n: rank + 1 if n == name else default_capacity(*layers[n]) for n in layers}
        torch.testing.assert_close(_logits(ours, ids), want, rtol=1e-12, atol=1e-12)


def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes,named", [
    ({"use_dora": True}, "use_dora=True"),
    ({"bias": "all"}, "bias='all'"),
    ({"lora_bias": True}, "lora_bias=True"),
    ({"peft_type": "IA3"}, "IA3"),
    ({"target_parameters": ["mlp.experts.weight"]}, "target_parameters"),
])
def test_unsupported_config_named_and_model_untouched(tmp_path, changes, named):
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    peft_model.save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    model = _bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=named):
        import_peft(model, tmp_path)
    assert not lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("changes,named", [
    ({"lora_alpha": float("nan")}, "lora_alpha is nan"),
    ({"lora_alpha": "8"}, "lora_alpha is '8'"),
    ({"lora_dropout": 1.5}, "lora_dropout is 1.5"),
    ({"lora_dropout": -0.1}, "lora_dropout is -0.1"),
    ({"r": "4"}, "r is '4'"),
    ({"use_rslora": "false"}, "use_rslora is 'false'"),
    ({"rank_pattern": ["query"]}, "rank_pattern is"),
    ({"rank_pattern": {"query": 2.5}}, r"rank_pattern\['query'\] is 2.5"),
    ({"alpha_pattern": {"output.dense": float("inf")}}, r"alpha_pattern\['output.dense'\] is inf"),
])
def test_bad_config_values_named_and_model_untouched(tmp_path, changes, named):
    """The layers are built from these values: a NaN alpha gave NaN outputs and a dropout of 1.5
    failed only in a later training forward; each is refused naming the field."""
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    peft_model.save_pretrained(tmp_path)
    _edit_config(tmp_path, **changes)
    model = _bert()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lorambo.AdapterFormatError, match=named):
        import_peft(model, tmp_path)
    assert not lora_layers(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_config_that_is_not_an_object(tmp_path):
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    peft_model.save_pretrained(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(lorambo.AdapterFormatError, match="adapter_config.json must hold a JSON object"):
        import_peft(_bert(), tmp_path)


def test_embedding_target_refused(tmp_path):
    peft_model = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["word_embeddings", "query"]))
    peft_model.save_pretrained(tmp_path)
    model = _bert()
    with pytest.raises(ValueError, match="lora_embedding"):
        import_peft(model, tmp_path)
    assert not lora_layers(model)
    with pytest.raises(ValueError, match="word_embeddings.*Embedding"):
        from_peft(peft_model)


def test_dora_refused_from_peft():
    peft_model = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query"], use_dora=True))
    with pytest.raises(ValueError, match="use_dora=True"):
        from_peft(peft_model)


@pytest.mark.parametrize("variant", ["kasa_config", "monteclora_config", "velora_config"])
def test_lora_variants_are_refused_naming_the_option(tmp_path, variant):
    """from_peft converted a KaSA model (base weight truncated, a learned diagonal between A and
    B) into plain LoRA (logits off by ~0.6 on a small Llama), and dropped MonteCLoRA's and VeLoRA's parts."""
    from peft.tuners.lora import config as lora_config

    sub = {"kasa_config": "KasaConfig", "monteclora_config": "MontecloraConfig", "velora_config": "VeloraConfig"}
    cfg = LoraConfig(r=2, target_modules=["query", "value"], init_lora_weights=False,
                     **{variant: getattr(lora_config, sub[variant])()})
    peft_model = get_peft_model(_bert(torch.float32), cfg).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = _logits(peft_model, ids)
    peft_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=f"unsupported peft LoRA feature.*{variant}="):
        from_peft(peft_model)
    torch.testing.assert_close(_logits(peft_model, ids), expected, rtol=0, atol=0)
    model = _bert(torch.float32)
    with pytest.raises(ValueError, match=f"unsupported peft LoRA feature.*{variant}="):
        import_peft(model, tmp_path)
    assert not lora_layers(model)


def test_rank_mismatch_and_missing_files(tmp_path):
    peft_model = get_peft_model(_bert(), LoraConfig(**BERT_CONFIG))
    peft_model.save_pretrained(tmp_path)
    _edit_config(tmp_path, rank_pattern={})
    with pytest.raises(lorambo.AdapterFormatError, match="intermediate.dense.* rank 6 in the weights but 4"):
        import_peft(_bert(), tmp_path)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(_bert(), tmp_path / "nowhere")


def test_a_folder_of_named_adapters_only_points_to_them(tmp_path):
    """peft saves every adapter but "default" in a folder of its name; the error said only
    "no adapter_config.json in <folder>"."""
    peft_model = get_peft_model(_bert(), LoraConfig(r=2, target_modules=["query"]), adapter_name="first")
    peft_model.add_adapter("second", LoraConfig(r=3, target_modules=["value"]))
    peft_model.save_pretrained(tmp_path)
    model = _bert()
    with pytest.raises(FileNotFoundError, match=r"no adapter_config.json in .*; it holds peft adapters in the "
                                                r"folders \['first', 'second'\]: pass one of those"):
        import_peft(model, tmp_path)
    assert not lora_layers(model)
    assert set(lora_layers(import_peft(model, tmp_path / "second"))) == {
        f"bert.encoder.layer.{i}.attention.self.value" for i in range(2)}


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_a_saved_adapter_whose_init_rewrites_the_base_is_refused_and_converts_through_peft(tmp_path, init):
    """peft re-runs PiSSA/OLoRA on loading and rewrites the base weights (W - s B0 A0): the saved A
    and B alone do not apply to the plain base (importing them anyway was off by ~1 here)."""
    build = lambda: _bert(torch.float32)  # noqa: E731  (PiSSA refuses float64)
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    init_lora_weights=init))
    _randomise_peft(peft_model, seed=3)
    peft_model.save_pretrained(tmp_path)
    model = build()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=rf"init_lora_weights='{init}'.*rewrites the base weights.*from_peft"):
        import_peft(model, tmp_path)
    assert not lora_layers(model) and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    loaded = PeftModel.from_pretrained(build(), tmp_path).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    expected = _logits(loaded, ids)
    torch.testing.assert_close(_logits(from_peft(loaded), ids), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init,dtype", [("gaussian", torch.float64), ("orthogonal", torch.float64),
                                        ("Gaussian", torch.float64), ("MiCA", torch.float32)])
def test_saved_adapters_of_base_keeping_inits_import(tmp_path, init, dtype):
    """peft reads "gaussian" and "mica" in any case; "Gaussian" and "MiCA" were refused as
    initialisations that rewrite the base weights."""
    build = lambda: _bert(dtype)  # noqa: E731  (MiCA's SVD refuses float64)
    peft_model = get_peft_model(build(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                    init_lora_weights=init))
    _randomise_peft(peft_model, seed=4)
    peft_model.save_pretrained(tmp_path)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    expected = _logits(PeftModel.from_pretrained(build(), tmp_path).eval(), ids)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(_logits(import_peft(build(), tmp_path), ids), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("convert", ["import_peft", "from_peft"])
def test_rank_above_min_in_out_imports_with_the_same_outputs(tmp_path, convert):
    """peft takes any rank; a pool holds at most min(in, out) slots. peft's all-linear gives the
    3-label classifier rank 4, and r=40 exceeds intermediate.dense's 32 inputs: the import
    failed ("rank 4 outside [0, capacity = 2]") on an adapter peft loads fine."""
    peft_model = get_peft_model(_bert(), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "classifier",
                                                                                          "intermediate.dense"],
                                                     rank_pattern={"intermediate.dense": 40}))
    _randomise_peft(peft_model, seed=21)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 64, (3, 9), generator=torch.Generator().manual_seed(8))
    expected = _logits(peft_model.eval(), ids)

    ours = import_peft(_bert(), tmp_path / "peft") if convert == "import_peft" else from_peft(peft_model)
    torch.testing.assert_close(_logits(ours, ids), expected, rtol=1e-12, atol=1e-12)
    layers = lora_layers(ours)
    assert layers["classifier"].rank == 3 and layers["classifier"].scaling == 2.0  # peft's 8 / 4
    assert layers["bert.encoder.layer.0.intermediate.dense"].rank == 32
    assert layers["bert.encoder.layer.0.intermediate.dense"].scaling == 0.2  # peft's 8 / 40
    assert layers["bert.encoder.layer.0.attention.self.query"].rank == 4
    ours(input_ids=ids).logits.sum().backward()
    for name, layer in layers.items():  # every slot trains: none is a zero row and column
        r = layer.rank
        assert layer.lora_A.grad[:r].abs().sum(1).min() > 0, name
        assert layer.lora_B.grad[:, :r].abs().sum(0).min() > 0, name

    export_peft(ours, tmp_path / "back")  # and peft reads it back
    reloaded = PeftModel.from_pretrained(_bert(), tmp_path / "back").eval()
    torch.testing.assert_close(_logits(reloaded, ids), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("empty", [None, [], (), set(), frozenset(), {}])
def test_an_empty_collection_means_a_feature_is_off(empty):
    """peft rewrites the config of a MoE model (Mixtral, OLMoE, ...) on get_peft_model, turning
    an unset target_parameters into set(); from_peft refused that plain LoRA adapter as using
    "unsupported peft LoRA feature(s) target_parameters=set()"."""
    check_peft_config({"target_parameters": empty, "layer_replication": empty, "trainable_token_indices": empty},
                      "adapter")
    with pytest.raises(ValueError, match=r"adapter: unsupported peft LoRA feature\(s\) target_parameters="
                                         r"\{'experts\.down_proj'\}"):
        check_peft_config({"target_parameters": {"experts.down_proj"}}, "adapter")
