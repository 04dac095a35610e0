"""Nothing half-done on disk or in the model: header validation, checksums, orphaned temporaries
of killed writers, the original error on a read-only filesystem, and loads that change nothing
when they fail."""

import errno
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import lorambo.adapters.atomic as atomic
import lorambo.adapters.io as io
from lorambo import AdapterFormatError, configure_model, load_adapter, lora_layers, save_adapter
from lorambo.adapters.format import LAYER_FIELDS, build_header

from adapter_models import net, trained  # tests/adapters/adapter_models.py

ROOT = Path(__file__).resolve().parents[2]


def snapshot(model):
    return ({n: type(m) for n, m in model.named_modules()},
            {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()},
            {n: (l.rank, l.scaling) for n, l in lora_layers(model).items()})


def assert_untouched(model, snap):
    types, params, layers = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for n, (value, flag) in params.items():
        assert torch.equal(now[n].detach(), value) and now[n].requires_grad == flag, n
    assert {n: (l.rank, l.scaling) for n, l in lora_layers(model).items()} == layers


def read(file):
    with safe_open(str(file), "pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def rewrite(file, edit_layers=None, edit_tensors=None, resign=True):
    """Rewrite the file with edited settings/tensors; ``resign`` recomputes the checksums, so
    the edit reaches the field checks instead of failing the checksum."""
    header, tensors = read(file)
    layers = json.loads(header["layers"])
    if edit_layers:
        layers = edit_layers(layers)
    if edit_tensors:
        edit_tensors(tensors)
    new = build_header(layers, tensors) if resign else dict(header, layers=json.dumps(layers))
    if not isinstance(layers, dict):
        new["layers"] = json.dumps(layers)
    save_file(tensors, str(file), metadata=new)


def loaded_into_lora_model_fails(file, match):
    dst = configure_model(net(), {"0": 2, "2": 2}, capacity=8)
    snap = snapshot(dst)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(dst, file)
    assert_untouched(dst, snap)
    bare = net()
    snap = snapshot(bare)
    with pytest.raises(AdapterFormatError, match=match):
        load_adapter(bare, file)
    assert_untouched(bare, snap)


def test_round_trip_is_exact_and_checksummed(tmp_path):
    src = trained()
    file = save_adapter(src, tmp_path / "a.safetensors")
    header, tensors = read(file)
    assert header["version"] == "2" and set(json.loads(header["checksums"])) == set(tensors) | {"__layers__"}
    dst = load_adapter(net(), file)
    x = torch.randn(4, 12)
    assert torch.equal(dst(x), src(x))


def test_bare_model_of_other_dimensions_is_left_untouched(tmp_path):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    wider = net(width=20)
    snap = snapshot(wider)
    with pytest.raises(ValueError, match=r"layer '0' was saved for shape \(out, in\) = \(16, 12\).*\(20, 12\)"):
        load_adapter(wider, file)
    assert_untouched(wider, snap)
    assert not lora_layers(wider) and all(p.requires_grad for p in wider.parameters())
    other = nn.Sequential(nn.Linear(12, 16))  # layer '2' does not exist
    snap = snapshot(other)
    with pytest.raises(ValueError, match="module '2' not found"):
        load_adapter(other, file)
    assert_untouched(other, snap)


@pytest.mark.parametrize("field,value", [
    ("scaling", "abc"), ("scaling", float("nan")), ("alpha", None), ("rank", 2.5), ("rank", -3),
    ("rank", True), ("capacity", 0), ("dropout", 1.0), ("use_rslora", "yes"), ("base_kind", "conv2d"),
    ("in_features", "12"), ("out_features", 0), ("out_features", 4.5),
])
def test_bad_header_value_is_named_and_nothing_is_written(tmp_path, field, value):
    file = save_adapter(trained(), tmp_path / "a.safetensors")

    def edit(layers):
        layers["2"][field] = value  # the second layer: the first one must not be written either
        return layers

    rewrite(file, edit)
    loaded_into_lora_model_fails(file, rf"layer '2': field '{field}' is")


@pytest.mark.parametrize("field", list(LAYER_FIELDS))
def test_missing_field_is_named(tmp_path, field):
    file = save_adapter(trained(), tmp_path / "a.safetensors")

    def edit(layers):
        del layers["2"][field]
        return layers

    rewrite(file, edit)
    loaded_into_lora_model_fails(file, rf"layer '2': field '{field}' is missing")


def test_layers_as_a_list_or_missing_header_fields(tmp_path):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    rewrite(file, lambda layers: list(layers.values()))
    loaded_into_lora_model_fails(file, r"header field 'layers' must be a JSON object.*list")
    for key in ("layers", "checksums"):
        file = save_adapter(trained(), tmp_path / f"{key}.safetensors")
        header, tensors = read(file)
        del header[key]
        save_file(tensors, str(file), metadata=header)
        loaded_into_lora_model_fails(file, rf"header field '{key}' is missing")


def test_rank_above_capacity_or_capacity_above_shape(tmp_path):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    rewrite(file, lambda l: {**l, "0": {**l["0"], "capacity": 2}})
    loaded_into_lora_model_fails(file, r"layer '0': rank 3 exceeds its capacity 2")
    rewrite(file, lambda l: {**l, "0": {**l["0"], "capacity": 13}})
    loaded_into_lora_model_fails(file, r"layer '0': capacity 13 exceeds min\(in_features, out_features\) = 12")


def test_flipped_tensor_bit_and_edited_settings_fail_the_checksum(tmp_path):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10  # inside the last tensor's bytes
    file.write_bytes(bytes(data))
    loaded_into_lora_model_fails(file, "checksum mismatch in tensor")
    file = save_adapter(trained(), tmp_path / "b.safetensors")
    rewrite(file, lambda l: {**l, "2": {**l["2"], "scaling": 0.75}}, resign=False)
    loaded_into_lora_model_fails(file, "checksum mismatch in the layer settings")


@pytest.mark.parametrize("edit,match", [
    (lambda tensors, sums: tensors.update(extra=torch.ones(2)), r"tensor 'extra' has no checksum"),
    (lambda tensors, sums: sums.pop("2.lora_B"), r"tensor '2.lora_B' has no checksum"),
    (lambda tensors, sums: sums.update(ghost=sums["0.lora_A"]),
     r"tensor\(s\) \['ghost'\] listed in the checksums are missing"),
])
def test_a_tensor_and_the_checksum_list_must_match_one_to_one(tmp_path, edit, match):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    header, tensors = read(file)
    sums = json.loads(header["checksums"])
    edit(tensors, sums)
    save_file(tensors, str(file), metadata=dict(header, checksums=json.dumps(sums)))
    loaded_into_lora_model_fails(file, match)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_tensors_are_refused_even_with_valid_checksums(tmp_path, bad):
    file = save_adapter(trained(), tmp_path / "a.safetensors")

    def poison(tensors):
        tensors["2.lora_B"][1, 2] = bad

    rewrite(file, edit_tensors=poison)
    loaded_into_lora_model_fails(file, r"tensor '2.lora_B' of layer '2' contains NaN or inf")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_parameter_of_a_module_to_save_is_refused_but_a_buffer_may_hold_inf(tmp_path, bad):
    """Only the LoRA tensors were checked: the trained head of a diverged run loaded with its NaN."""
    def with_mask(model):  # a buffer that legitimately holds -inf (an attention mask, say)
        model[4].register_buffer("mask", torch.tensor([float("-inf"), 0.0]))
        return model

    src = with_mask(configure_model(net(), {"0": 2, "2": 2}, capacity=8, modules_to_save=["4"]))
    file = save_adapter(src, tmp_path / "a.safetensors")
    assert torch.equal(load_adapter(with_mask(net()), file)[4].mask, src[4].mask)

    def poison(tensors):
        tensors["modules_to_save::4::weight"][1, 0] = bad

    rewrite(file, edit_tensors=poison)
    for dst in (with_mask(configure_model(net(), {"0": 2, "2": 2}, capacity=8)), with_mask(net())):
        snap = snapshot(dst)
        with pytest.raises(AdapterFormatError, match=r"module to save '4': parameter 'weight' contains NaN or inf"):
            load_adapter(dst, file)
        assert_untouched(dst, snap)


def test_version_1_files_without_checksums_still_load(tmp_path):
    src = trained()
    file = save_adapter(src, tmp_path / "a.safetensors")
    header, tensors = read(file)
    save_file(tensors, str(file), metadata={"format": header["format"], "version": "1",
                                            "layers": header["layers"]})
    dst = load_adapter(net(), file)
    x = torch.randn(3, 12)
    assert torch.equal(dst(x), src(x))


# ---------------------------------------------------------------------- writers and the disk
_SLOW_WRITER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("atomic", sys.argv[1])
atomic = importlib.util.module_from_spec(spec); spec.loader.exec_module(atomic)
def write(tmp):
    with open(tmp, "wb") as handle:
        handle.write(b"x" * (1 << 20)); handle.flush()
        print("writing", flush=True)
        time.sleep(60)
atomic.atomic_write(sys.argv[2], write)
"""


def _orphans(folder):
    return sorted(p.name for p in folder.iterdir() if ".lorambo-tmp." in p.name)


def test_temporaries_of_killed_writers_are_removed_by_the_next_save(tmp_path):
    target = tmp_path / "a.safetensors"
    save_adapter(trained(), target)
    before = target.read_bytes()
    left = []
    for _ in range(2):  # kill -9 in the middle of a write, twice
        proc = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER, atomic.__file__, str(target)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        left.append(_orphans(tmp_path))
    # each kill leaves one 1 MiB temporary; the second writer already removed the first's
    assert len(left[0]) == 1 and len(left[1]) == 1 and left[0] != left[1]
    assert (tmp_path / left[1][0]).stat().st_size == 1 << 20 and target.read_bytes() == before
    # a live writer's temporary (this process) is not touched
    live = tmp_path / f".a.safetensors.lorambo-tmp.{atomic._host()}.{os.getpid()}.newabcd"
    live.write_bytes(b"in progress")
    save_adapter(trained(), target)
    assert _orphans(tmp_path) == [live.name]
    load_adapter(net(), target)


def test_read_only_filesystem_shows_the_original_error(tmp_path, monkeypatch):
    target = tmp_path / "a.safetensors"
    original = OSError(errno.EROFS, "Read-only file system", str(target))

    def refuse(tensors, path, metadata):
        raise original

    def unlink_refused(self, missing_ok=False):
        raise OSError(errno.EROFS, "Read-only file system (cleanup)", str(self))

    monkeypatch.setattr(io, "save_file_canonical", refuse)
    monkeypatch.setattr(Path, "unlink", unlink_refused)
    with pytest.raises(OSError) as caught:
        save_adapter(trained(), target)
    assert caught.value is original and "cleanup" not in str(caught.value.__context__ or "")


@pytest.mark.parametrize("a_existed", [True, False])
def test_atomic_write_many_puts_back_files_replaced_before_a_failing_rename(tmp_path, monkeypatch, a_existed):
    # a file that did not exist before is removed again
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    if a_existed:
        a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace

    def fail_on_b(src, dst):
        if Path(dst) == b:
            raise OSError(errno.EIO, "rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", fail_on_b)
    with pytest.raises(OSError, match="rename failed"):
        atomic.atomic_write_many({a: atomic.text_writer("new a"), b: atomic.text_writer("new b")})
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert (a.read_text() if a_existed else a.exists()) == ("old a" if a_existed else False)
    assert b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"][not a_existed:]
    atomic.atomic_write_many({a: atomic.text_writer("new a"), b: atomic.text_writer("new b")})
    assert a.read_text() == "new a" and b.read_text() == "new b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_export_peft_keeps_both_old_files_when_the_config_write_fails(tmp_path, monkeypatch):
    import lorambo.adapters.peft_export as peft_export
    from lorambo import export_peft

    model = trained()
    export_peft(model, tmp_path / "peft")
    old = {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()}
    assert set(old) == {"adapter_config.json", "adapter_model.safetensors"}
    model[0].set_rank(6)

    def failing_writer(text):
        def write(tmp):
            Path(tmp).write_text(text[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write

    monkeypatch.setattr(peft_export, "text_writer", failing_writer)
    with pytest.raises(OSError, match="No space left"):
        export_peft(model, tmp_path / "peft")
    assert {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()} == old
    monkeypatch.undo()
    export_peft(model, tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    with safe_open(str(tmp_path / "peft" / "adapter_model.safetensors"), "pt") as f:
        assert f.get_slice("base_model.model.0.lora_A.weight").get_shape() == [6, 12]
    assert config["rank_pattern"]["0"] == 6


def test_figures_are_written_atomically_in_the_format_of_their_suffix(tmp_path, monkeypatch):
    """Plots (heat maps, demo figures, benchmark PNGs) go through a temporary file: a save that
    dies half-way (disk full, killed) keeps the previous file whole, and the format follows the
    target's suffix."""
    pytest.importorskip("matplotlib")
    import matplotlib.figure
    import matplotlib.pyplot as plt

    from lorambo.allocation.report import save_heatmap

    ranks = {"h.0.q": 4, "h.0.v": 2, "h.1.q": 1}
    png = save_heatmap(ranks, tmp_path / "ranks.png")
    before = png.read_bytes()
    assert before[:8] == b"\x89PNG\r\n\x1a\n"

    def dies_half_way(self, fname, **kwargs):
        with open(fname, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(matplotlib.figure.Figure, "savefig", dies_half_way)
        with pytest.raises(OSError, match="No space left"):
            save_heatmap({"h.0.q": 8}, png)
    assert png.read_bytes() == before
    try:
        atomic.atomic_save_figure(plt.figure(), tmp_path / "figure.svg")
    finally:
        plt.close("all")
    assert (tmp_path / "figure.svg").read_text().lstrip().startswith("<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.svg", "ranks.png"]  # no temporaries left


@pytest.mark.parametrize("tail", ["garbage", "host.notapid.new1234", "x.y"])
def test_a_temporary_name_not_made_by_a_writer_is_left_alone(tmp_path, tail):
    # not <host>.<pid>.<token>: no dead writer's temporary, so the save neither removes it nor fails on it
    target = tmp_path / "a.txt"
    odd = tmp_path / f".a.txt{atomic._MARK}{tail}"
    odd.write_text("someone else's")
    atomic.atomic_write_text(target, "new")
    assert target.read_text() == "new" and odd.read_text() == "someone else's"
