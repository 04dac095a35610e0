"""Where a save cannot write: a folder where the file goes, a file where a folder goes. The error
names the function and the paths, before anything is written; a failed write into missing
folders leaves none of them behind."""

import os

import pytest
import torch

import lorambo
from lorambo import export_peft, save_adapter
from lorambo.allocation.report import save_heatmap

from adapter_models import net, trained  # tests/adapters/adapter_models.py


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files)


@pytest.fixture
def spots(tmp_path):
    (tmp_path / "taken.safetensors").mkdir()           # a folder with a file's name
    (tmp_path / "ckpt" / "adapter.safetensors").mkdir(parents=True)
    (tmp_path / "notes").write_text("keep me\n")         # a file without the suffix
    return tmp_path


def test_save_adapter_onto_a_folder_or_below_a_file_names_the_function_and_paths(spots):
    # before: IsADirectoryError about '.taken.safetensors.lorambo-tmp.<host>.<pid>.new<hex>' -> ...,
    # or FileExistsError: [Errno 17] File exists: '.../notes' (from mkdir)
    model, before = trained(), _tree(spots)
    cases = [
        (spots / "taken.safetensors", IsADirectoryError,
         f"save_adapter: cannot write the file {spots / 'taken.safetensors'}: a folder of that name exists"),
        (spots / "ckpt", IsADirectoryError,
         f"save_adapter: cannot write the file {spots / 'ckpt' / 'adapter.safetensors'}: a folder of that name exists"),
        (spots / "notes", NotADirectoryError,
         f"save_adapter: {spots / 'notes'} is a file without the .safetensors suffix; such a path names a folder, "
         "which gets adapter.safetensors"),
        (spots / "notes" / "sub" / "a.safetensors", NotADirectoryError,
         f"save_adapter: cannot write {spots / 'notes' / 'sub' / 'a.safetensors'}: {spots / 'notes'} is a file, "
         "not a folder"),
    ]
    for path, error, message in cases:
        with pytest.raises(error) as raised:
            save_adapter(model, path)
        assert str(raised.value).startswith(message)
    assert _tree(spots) == before and (spots / "notes").read_text() == "keep me\n"


def test_export_peft_and_save_heatmap_name_themselves(spots):
    pytest.importorskip("matplotlib", reason="save_heatmap's optional dependency")
    before = _tree(spots)
    with pytest.raises(NotADirectoryError, match=rf"^export_peft: cannot write .*adapter_model.safetensors: "
                                                 rf"{spots / 'notes'} is a file, not a folder$"):
        export_peft(trained(), spots / "notes")
    (spots / "peft" / "adapter_config.json").mkdir(parents=True)
    with pytest.raises(IsADirectoryError, match=r"^export_peft: cannot write the file .*adapter_config.json: a folder"):
        export_peft(trained(), spots / "peft")
    assert os.listdir(spots / "peft") == ["adapter_config.json"]
    with pytest.raises(NotADirectoryError, match=r"^save_heatmap: cannot write .*ranks.png: .*notes is a file"):
        save_heatmap({"h.0.q": 1}, spots / "notes" / "ranks.png")
    assert _tree(spots) == sorted(before + ["peft", os.path.join("peft", "adapter_config.json")])


def test_a_failed_write_removes_the_folders_it_created(tmp_path, monkeypatch):
    # before: run/new/adapter/ stayed behind, empty, after the write failed
    model = trained()
    (tmp_path / "run").mkdir()
    import lorambo.adapters.io as io

    def broken(tensors, path, metadata):
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file_canonical", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "run" / "new" / "adapter")
    assert _tree(tmp_path) == ["run"]
    monkeypatch.undo()
    file = save_adapter(model, tmp_path / "run" / "new" / "adapter")
    assert file == tmp_path / "run" / "new" / "adapter" / "adapter.safetensors"
    x = torch.randn(3, 12)
    assert torch.equal(lorambo.load_adapter(net(), file)(x), model(x))


def test_load_adapter_of_a_file_without_the_suffix_says_why_it_was_not_found(tmp_path):
    # before: "no lorambo adapter at .../run/adapter/adapter.safetensors" while .../run/adapter was the file
    model = trained()
    file = save_adapter(model, tmp_path / "a.safetensors")
    file.rename(tmp_path / "adapter")
    looked_at = tmp_path / "adapter" / "adapter.safetensors"
    with pytest.raises(FileNotFoundError, match=rf"^no lorambo adapter at {looked_at}; {tmp_path / 'adapter'} is a "
                                                r"file, and a path without the \.safetensors suffix names a folder"):
        lorambo.load_adapter(net(), tmp_path / "adapter")
    (tmp_path / "adapter").rename(tmp_path / "adapter.safetensors")
    x = torch.randn(3, 12)
    assert torch.equal(lorambo.load_adapter(net(), tmp_path / "adapter.safetensors")(x), model(x))


def test_a_safetensors_suffix_in_any_case_names_the_file(tmp_path):
    """``X.SAFETENSORS`` is the file itself for save and load, as ``X.safetensors`` is; a
    case-sensitive check made it a folder holding adapter.safetensors."""
    model = trained()
    written = save_adapter(model, tmp_path / "Run.SafeTensors")
    assert written == tmp_path / "Run.SafeTensors" and written.is_file()
    assert _tree(tmp_path) == ["Run.SafeTensors"]
    loaded = lorambo.load_adapter(net(), tmp_path / "Run.SafeTensors")
    want = {n: p for n, p in model.state_dict().items() if "lora_" in n}
    got = {n: p for n, p in loaded.state_dict().items() if "lora_" in n}
    assert want.keys() == got.keys() and all(torch.equal(want[n], got[n]) for n in want)
