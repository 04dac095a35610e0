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


def test_use_keeps_the_absolute_path_for_the_processes_it_starts(tmp_path, monkeypatch):
    """A relative ``--bundle`` still names the bundle once the working folder changes."""
    model, data = _fake_sources(tmp_path)
    build(tmp_path / "b", model_dir=model, data_dir=data)
    monkeypatch.setenv(bundle.ENV, "")
    monkeypatch.chdir(tmp_path)
    assert bundle.use("b") == tmp_path.resolve() / "b"
    monkeypatch.chdir(model)
    assert bundle.active() == tmp_path.resolve() / "b"
    assert sentiment_data.data_path(sentiment_data.LICENSE_FILE) == tmp_path.resolve() / "b" / "vader" / \
        sentiment_data.LICENSE_FILE


@pytest.mark.parametrize("text, error", [
    ("{\"format\": 1, \"files\": {", "manifest.json is not valid JSON"),
    ("[]", "manifest.json is not a format-1 bundle manifest"),
    ("{\"format\": 2, \"files\": {}}", "manifest.json is not a format-1 bundle manifest"),
    ("{\"format\": 1, \"files\": []}", "manifest.json is not a format-1 bundle manifest"),
    ("{\"format\": 1}", "manifest.json is not a format-1 bundle manifest"),
])
def test_a_damaged_manifest_is_refused_naming_the_bundle(tmp_path, monkeypatch, text, error):
    model, data = _fake_sources(tmp_path)
    target = tmp_path / "b"
    build(target, model_dir=model, data_dir=data)
    (target / "manifest.json").write_text(text)
    monkeypatch.setenv(bundle.ENV, "")
    with pytest.raises(ValueError, match=f"bundle {target}: {error}"):
        bundle.use(target)
    assert bundle.active() is None  # nothing was made active
    with pytest.raises(ValueError, match=error):
        bundle.verify(target)


def test_module_command_builds_and_verifies(tmp_path, monkeypatch, capsys):
    """``python -m lorambo.experiments.bundle {build,verify} DIR`` (``make gpu-bundle``): a path
    given as text, the default sources, one error line and exit status 1 for an altered file."""
    model, data = _fake_sources(tmp_path)
    (tmp_path / "cache").mkdir()
    data.rename(tmp_path / "cache" / "vader")
    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr("lorambo.experiments.minilm.minilm_path", lambda: model)
    target = str(tmp_path / "gpu_bundle")
    assert bundle.main(["build", target]) == 0
    files = len(bundle.verify(target)["files"])
    assert capsys.readouterr().out.startswith(f"bundle {target}: {files} files + manifest.json, ")
    monkeypatch.setattr("sys.argv", ["bundle.py", "verify", target])  # `python -m ...`: the arguments from sys.argv
    assert bundle.main() == 0
    assert capsys.readouterr().out == f"bundle {target}: {files} files match manifest.json\n"
    (tmp_path / "gpu_bundle" / "model" / "vocab.txt").write_text("[PAD]\n[CLS]\n[SEP]\n")
    assert bundle.main(["verify", target]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("lorambo.experiments.bundle verify: error: bundle ") and err.count("\n") == 1
    assert "model/vocab.txt does not match its manifest.json" in err
    for argv in (["check", target], ["verify"], ["build", target, "extra"]):
        assert bundle.main(argv) == 2
        assert capsys.readouterr().err.startswith("usage: python -m lorambo.experiments.bundle {build,verify} DIR")


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path, monkeypatch):
    """A bundle whose manifest lacks an entry (built by an older version, or edited) names the file
    instead of reading an unverified copy."""
    model, data = _fake_sources(tmp_path)
    target = tmp_path / "b"
    manifest = build(target, model_dir=model, data_dir=data)
    name = "nytEditorialSnippets_GroundTruth.txt"
    del manifest["files"][f"vader/{name}"]
    (target / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv(bundle.ENV, str(target))
    with pytest.raises(FileNotFoundError, match=f"bundle {target}: vader/{name} is not in its manifest.json"):
        sentiment_data.data_path(name)
    assert bundle.model_dir(target) == target / "model"
    for key in [k for k in manifest["files"] if k.startswith("model/")]:
        del manifest["files"][key]
    (target / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(FileNotFoundError, match=f"bundle {target}: its manifest.json lists no model/ files"):
        bundle.model_dir(target)


@pytest.mark.parametrize("damage, error, kind", [
    ("overflow", "bundle: weight w of .*model.safetensors overflows fp16", ValueError),
    ("tokenizer_config.json", "bundle: .*src_model/tokenizer_config.json not found", FileNotFoundError),
    ("model.safetensors", "bundle: .*src_model/model.safetensors not found", FileNotFoundError),
])
def test_a_model_that_cannot_be_bundled_leaves_the_old_bundle(tmp_path, damage, error, kind):
    """A weight too large for fp16 (it would load as inf) or a missing model file is refused; the
    bundle already there stays, and no temporary folder is left beside it."""
    from safetensors.torch import save_file

    model, data = _fake_sources(tmp_path)
    target = tmp_path / "b"
    manifest = build(target, model_dir=model, data_dir=data)
    if damage == "overflow":
        w = torch.randn(4, 3, generator=torch.Generator().manual_seed(3))
        w[1, 2] = 7e4  # fp16's largest finite value is 65504
        save_file({"w": w}, str(model / "model.safetensors"))
    else:
        (model / damage).unlink()
    with pytest.raises(kind, match=error):
        build(target, model_dir=model, data_dir=data)
    assert bundle.verify(target) == manifest
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_a_failed_final_rename_puts_the_old_bundle_back(tmp_path, monkeypatch):
    """The old bundle is moved aside before the new one is renamed into place; where that rename
    fails (a full disk, a signal), the old bundle goes back under its name, whole."""
    import os

    from lorambo.experiments import bundle_build

    model, data = _fake_sources(tmp_path)
    target = tmp_path / "b"
    manifest = build(target, model_dir=model, data_dir=data)
    real_replace = os.replace

    def replace_failing_into_target(src, dst):
        if str(dst) == str(target) and ".old." not in str(src):
            raise OSError("no space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(bundle_build.os, "replace", replace_failing_into_target)
    with pytest.raises(OSError, match="no space left"):
        build(target, model_dir=model, data_dir=data)
    assert bundle.verify(target) == manifest
    assert [p for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("entry", [{}, {"sha256": "00" * 32}, [], {"sha256": 3, "size": 10}, {"sha256": "ab", "size": "10"}])
def test_a_malformed_manifest_entry_is_an_error_naming_it(tmp_path, capsys, entry):
    """An entry without an integer size and a sha256 text used to escape as KeyError/TypeError
    (a traceback from `bundle verify`, whose errors are one line) or pass as a mismatch."""
    model, data = _fake_sources(tmp_path)
    target = tmp_path / "b"
    manifest = build(target, model_dir=model, data_dir=data)
    manifest["files"]["model/config.json"] = entry
    (target / "manifest.json").write_text(json.dumps(manifest))
    error = f"bundle {target}: manifest.json entry 'model/config.json' is not "
    with pytest.raises(ValueError, match=error):
        bundle.verify(target)
    with pytest.raises(ValueError, match=error):
        bundle.use(target)
    assert bundle.main(["verify", str(target)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("lorambo.experiments.bundle verify: error: " + error) and err.count("\n") == 1
