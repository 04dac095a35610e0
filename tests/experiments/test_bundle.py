"""The bundle (MiniLM in fp16 + data + manifest): build, verify, load, and refuse altered files."""

import json

import pytest
import torch

from lorambo.experiments import bundle, sentiment_data
from lorambo.experiments.bundle_build import LIMIT, build, size_on_disk


def _fake_sources(root):
    """A model folder with two small tensors and the data files with made-up contents."""
    from safetensors.torch import save_file

    model, data = root / "src_model", root / "src_data"
    model.mkdir()
    data.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}')
    (model / "tokenizer_config.json").write_text("{}")
    (model / "vocab.txt").write_text("[PAD]\n[CLS]\n")
    gen = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(4, 3, generator=gen), "ids": torch.arange(5)}, str(model / "model.safetensors"))
    for name in (*sentiment_data.FILES.values(), sentiment_data.LICENSE_FILE):
        (data / name).write_text(f"contents of {name}\n")
    return model, data


def test_fake_bundle_round_trip_and_tampering(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model, data = _fake_sources(tmp_path)
    target = tmp_path / "bundle"
    manifest = build(target, model_dir=model, data_dir=data)
    assert sorted(manifest["files"]) == sorted(
        [f"model/{n}" for n in ("config.json", "tokenizer_config.json", "vocab.txt", "model.safetensors")]
        + [f"vader/{n}" for n in (*sentiment_data.FILES.values(), sentiment_data.LICENSE_FILE)])
    assert json.loads((target / "manifest.json").read_text()) == manifest
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
    assert bundle.verify(target) == manifest
    weights = load_file(str(target / "model" / "model.safetensors"))
    source = load_file(str(model / "model.safetensors"))
    assert weights["w"].dtype == torch.float16 and torch.equal(weights["w"], source["w"].half())
    assert torch.equal(weights["ids"], source["ids"])  # integer tensors keep their dtype

    monkeypatch.setenv(bundle.ENV, str(target))
    name = "amazonReviewSnippets_GroundTruth.txt"
    assert sentiment_data.data_path(name) == target / "vader" / name
    path = target / "vader" / name
    path.write_text(path.read_text().replace("contents", "CONTENTS"))  # same size, other bytes
    with pytest.raises(ValueError, match=f"vader/{name} does not match its manifest.json"):
        sentiment_data.data_path(name)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=f"vader/{name} is missing"):
        bundle.verify(target)

    build(target, model_dir=model, data_dir=data)  # rebuilding replaces the folder
    assert bundle.verify(target)["files"] == manifest["files"]
    with pytest.raises(ValueError, match="exceeds the 0 MiB limit"):
        build(tmp_path / "small", model_dir=model, data_dir=data, limit=100)
    assert not (tmp_path / "small").exists() and [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (data / sentiment_data.DATA_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="run `make data`"):
        build(tmp_path / "other", model_dir=model, data_dir=data)
    with pytest.raises(FileNotFoundError, match="no manifest.json"):
        bundle.use(tmp_path)


def test_build_refuses_to_replace_a_folder_or_file_that_is_no_bundle(tmp_path):
    """`bundle build DIR` on an existing folder that is not a bundle moved it aside and deleted
    it, whatever it held (`build docs` deleted docs/); now it refuses and touches nothing."""
    model, data = _fake_sources(tmp_path)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    a_file = tmp_path / "a-file"
    a_file.write_text("keep me too")
    for target in (mine, a_file):
        with pytest.raises(ValueError, match=f"bundle: {target} exists and is not a bundle"):
            build(target, model_dir=model, data_dir=data)
    assert (mine / "notes.txt").read_text() == "keep me" and a_file.read_text() == "keep me too"
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    (tmp_path / "empty").mkdir()
    build(tmp_path / "empty", model_dir=model, data_dir=data)  # an empty folder is fine
    assert bundle.verify(tmp_path / "empty")


@pytest.mark.slow
def test_real_bundle_loads_the_same_model_and_data(tmp_path, monkeypatch):
    """Built from the installed model package and the `make data` folder: under the size limit,
    and every loader reads the same things from it (the weights rounded to fp16)."""
    from lorambo.experiments.minilm import load_minilm
    from lorambo.experiments.snippet_text import snippet_documents

    target = tmp_path / "gpu_bundle"
    manifest = build(target)
    size = size_on_disk(target)
    print(f"bundle: {size / 2**20:.1f} MiB")
    assert size <= LIMIT and size == manifest["files_bytes"] + (target / "manifest.json").stat().st_size
    direct_model, _ = load_minilm()
    sentences, documents = sentiment_data.load_sentences(), snippet_documents()

    monkeypatch.setenv(bundle.ENV, "")  # restored after the test, whatever use() sets
    bundle.use(target)
    model, tokenizer = load_minilm()
    assert tokenizer("a fine film")["input_ids"][0] == tokenizer.cls_token_id
    ours, theirs = dict(model.named_parameters()), dict(direct_model.named_parameters())
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        assert p.dtype == torch.float32 and torch.equal(p, theirs[name].half().float()), name
    assert sentiment_data.load_sentences() == sentences and snippet_documents() == documents

    weights = target / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-1] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model/model.safetensors does not match its manifest.json"):
        load_minilm()


def test_a_variable_naming_no_bundle_says_which_variable(tmp_path, monkeypatch, capsys):
    # before: "bundle DIR: no manifest.json; build one with `make gpu-bundle`", not naming the variable
    from lorambo.cli import main

    monkeypatch.setenv(bundle.ENV, str(tmp_path / "gone"))
    with pytest.raises(FileNotFoundError, match=rf"\$LORAMBO_BUNDLE='{tmp_path / 'gone'}' names no bundle "
                                                r"\(no manifest.json there\): unset LORAMBO_BUNDLE"):
        bundle.active()
    assert main(["experiment", "--steps", "5", "--methods", "uniform", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lorambo experiment: error: $LORAMBO_BUNDLE=") and "Traceback" not in err, err
