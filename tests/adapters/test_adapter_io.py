"""save_adapter / load_adapter: round trip, auto-configure, atomic writes, bad files."""

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from lorambo import AdapterFormatError, configure_model, export_peft, load_adapter, lora_layers, save_adapter

from adapter_models import net, trained  # tests/adapters/adapter_models.py


def test_round_trip_into_freshly_configured_model(tmp_path):
    src = trained()
    file = save_adapter(src, tmp_path / "a.safetensors")
    dst = configure_model(net(), {"0": 1, "2": 1}, capacity=8, alpha=16.0, dropout=0.25, use_rslora=True)
    load_adapter(dst, file)
    x = torch.randn(5, 12)
    assert torch.equal(dst(x), src(x))

    def settings(model):  # the file's replace those the layers were built with (docs/model.md)
        return {n: (l.rank, l.scaling, l.alpha, l.use_rslora, l.dropout) for n, l in lora_layers(model).items()}

    assert settings(dst) == settings(src) and {n: l.rank for n, l in lora_layers(dst).items()} == {"0": 3, "2": 5}
    with safe_open(str(file), "pt") as f:  # only the active slices are stored
        assert f.get_slice("2.lora_A").get_shape() == [5, 16]


def test_load_configures_a_plain_model_and_directory_paths(tmp_path):
    src = trained()
    save_adapter(src, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "adapter.safetensors").is_file()
    dst = load_adapter(net(), tmp_path / "ckpt")
    x = torch.randn(4, 12)
    assert torch.equal(dst(x), src(x))
    assert {n: l.capacity for n, l in lora_layers(dst).items()} == {"0": 8, "2": 8}


def test_write_is_atomic_and_leaves_no_temp_files(tmp_path, monkeypatch):
    src = trained()
    target = tmp_path / "a.safetensors"
    save_adapter(src, target)
    before = target.read_bytes()
    import lorambo.adapters.io as io

    def broken(tensors, path, metadata):
        with open(path, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(io, "save_file_canonical", broken)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(src, target)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.safetensors"]


def test_other_names_or_shapes_are_rejected_without_changes(tmp_path):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    other_names = configure_model(net(), {"0": 2, "4": 2})
    with pytest.raises(ValueError, match=r"in the model but not the file \['4'\].*not the model \['2'\]"):
        load_adapter(other_names, file)
    wider = nn.Sequential(nn.Linear(12, 20), nn.GELU(), nn.Linear(20, 12))
    configure_model(wider, {"0": 2, "2": 2}, capacity=8)
    a_before = wider[0].lora_A.detach().clone()
    with pytest.raises(ValueError, match=r"layer '0' was saved for shape \(out, in\) = \(16, 12\).*\(20, 12\)"):
        load_adapter(wider, file)
    assert torch.equal(wider[0].lora_A, a_before) and wider[0].rank == 2
    small = configure_model(net(), {"0": 2, "2": 2}, capacity=4)
    with pytest.raises(ValueError, match=r"layer '2' has rank 5 above the layer's capacity 4"):
        load_adapter(small, file)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "not_lorambo"])
def test_truncated_or_corrupt_files(tmp_path, damage):
    file = save_adapter(trained(), tmp_path / "a.safetensors")
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"\x00\x01not a safetensors file at all")
    else:
        from safetensors.torch import save_file

        save_file({"w": torch.randn(2, 2)}, str(file))
    dst = configure_model(net(), {"0": 3, "2": 5}, capacity=8)
    with pytest.raises(AdapterFormatError, match="a.safetensors"):
        load_adapter(dst, file)


def test_missing_file_and_empty_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="no lorambo adapter"):
        load_adapter(net(), tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="^save_adapter: Sequential has no LoRAMBoLinear"):
        save_adapter(net(), tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="^export_peft: Sequential has no LoRAMBoLinear"):
        export_peft(net(), tmp_path / "peft")


def test_each_loader_given_the_other_format_says_which_to_use(tmp_path):
    from lorambo import export_peft, import_peft

    export_peft(trained(), tmp_path / "peft")
    save_adapter(trained(), tmp_path / "ours")
    with pytest.raises(FileNotFoundError, match="holds a peft adapter .*lorambo.import_peft"):
        load_adapter(net(), tmp_path / "peft")
    with pytest.raises(FileNotFoundError, match="is a lorambo adapter: load it with lorambo.load_adapter"):
        import_peft(net(), tmp_path / "ours")


def test_a_file_of_a_peft_folder_given_to_either_loader_points_to_the_folder(tmp_path):
    # before: import_peft(model, "peft/adapter_model.safetensors") said "that is a lorambo adapter:
    # load it with lorambo.load_adapter", and load_adapter said only "is not a lorambo adapter"
    from lorambo import export_peft, import_peft

    export_peft(trained(), tmp_path / "peft")
    folder = tmp_path / "peft"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        with pytest.raises(FileNotFoundError, match=rf"{name} is a file of the peft adapter folder .*peft: pass "
                                                    "that folder") as info:
            import_peft(net(), folder / name)
        assert "lorambo adapter" not in str(info.value)
    with pytest.raises(AdapterFormatError, match=r"is not a lorambo adapter \(format 'pt'\); it is in a peft "
                                                 r"adapter folder: load that with lorambo.import_peft\(model, "):
        load_adapter(net(), folder / "adapter_model.safetensors")
    x = torch.randn(5, 12)
    torch.testing.assert_close(import_peft(net(), folder)(x), trained()(x), rtol=1e-6, atol=1e-6)  # as told


def test_tied_modules_to_save_are_written_by_both_savers(tmp_path):
    """GPT-2's lm_head shares its weight with wte: with both in modules_to_save, the CPU tensors
    handed to safetensors shared memory and save_adapter / export_peft raised."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2)

    def base():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).double().eval()

    model = configure_model(base(), 2, target_modules=["c_attn"], modules_to_save=["wte", "lm_head"])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        wte = model.transformer.wte.weight
        wte.add_(0.1 * torch.randn(wte.shape, generator=g, dtype=wte.dtype))
        for layer in lora_layers(model).values():
            layer.lora_B[:, :2].copy_(torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64))
    ids = torch.randint(0, 40, (2, 8), generator=g)
    with torch.no_grad():
        expected = model(ids).logits
        loaded = load_adapter(base(), save_adapter(model, tmp_path / "a"))
        torch.testing.assert_close(loaded(ids).logits, expected, rtol=0, atol=0)
        from lorambo import export_peft

        served = peft.PeftModel.from_pretrained(base(), export_peft(model, tmp_path / "p")).eval()
        torch.testing.assert_close(served(ids).logits, expected, rtol=0, atol=1e-12)


def test_a_weight_tied_three_ways_in_a_module_to_save_is_written_by_both_savers(tmp_path):
    """Three state-dict tensors on one storage: each after the first needs its own copy, or
    safetensors refuses the shared memory (two of them were all the GPT-2 test tied)."""
    def base():
        torch.manual_seed(0)
        heads = nn.ModuleDict({k: nn.Linear(6, 3, bias=False) for k in "abc"})
        heads.b.weight = heads.c.weight = heads.a.weight
        return nn.ModuleDict({"body": nn.Linear(4, 6), "heads": heads})

    def forward(model, x):
        h = model.body(x)
        return torch.cat([model.heads[k](h) for k in "abc"], dim=-1)

    model = configure_model(base(), {"body": 2}, modules_to_save=["heads"])
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        model.heads.a.weight.add_(torch.randn(3, 6, generator=g))
        lora_layers(model)["body"].lora_B[:, :2].copy_(torch.randn(6, 2, generator=g))
    x = torch.randn(5, 4, generator=g)
    with torch.no_grad():
        loaded = load_adapter(base(), save_adapter(model, tmp_path / "a"))
        torch.testing.assert_close(forward(loaded, x), forward(model, x), rtol=0, atol=0)
    tensors = load_file(export_peft(model, tmp_path / "p") / "adapter_model.safetensors")
    for k in "abc":
        assert torch.equal(tensors[f"base_model.model.heads.{k}.weight"], model.heads.a.weight)


def test_a_lone_lora_layer_is_refused_before_writing(tmp_path):
    """Its name in the file was '': save_adapter wrote a file that load_adapter then refused."""
    from lorambo import LoRAMBoLinear, export_peft

    layer = LoRAMBoLinear(nn.Linear(8, 8), rank=2)
    for save in (save_adapter, export_peft):
        with pytest.raises(ValueError, match="the model is itself a LoRAMBoLinear"):
            save(layer, tmp_path)
    assert list(tmp_path.iterdir()) == []
    file = save_adapter(nn.Sequential(layer), tmp_path)  # what the message suggests loads back
    loaded = load_adapter(nn.Sequential(nn.Linear(8, 8)), file)
    assert lora_layers(loaded)["0"].rank == 2


@pytest.mark.parametrize("wrap", ["compile", "ddp"])
def test_wrapped_models_save_and_load_under_the_plain_names(tmp_path, wrap):
    """torch.compile and DDP prefix every name (_orig_mod., module.): files written from the wrapper
    named layers that no plain model has, so load_adapter and peft refused them."""
    peft = pytest.importorskip("peft")
    from lorambo import export_peft, import_peft

    model = trained()
    x = torch.randn(5, 12, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    if wrap == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        wrapped = (torch.compile(model, backend="eager") if wrap == "compile"
                   else torch.nn.parallel.DistributedDataParallel(model))
        save_adapter(wrapped, tmp_path / "a")
        export_peft(wrapped, tmp_path / "p")
        fresh = torch.compile(net(), backend="eager") if wrap == "compile" else None
        with torch.no_grad():
            torch.testing.assert_close(load_adapter(net(), tmp_path / "a")(x), expected, rtol=0, atol=0)
            served = peft.PeftModel.from_pretrained(net(), tmp_path / "p")
            torch.testing.assert_close(served(x), expected, rtol=1e-6, atol=1e-6)
            if fresh is not None:  # and loaded into through the wrapper
                torch.testing.assert_close(load_adapter(fresh, tmp_path / "a")(x), expected, rtol=0, atol=0)
                torch.testing.assert_close(import_peft(torch.compile(net(), backend="eager"), tmp_path / "p")(x),
                                           expected, rtol=1e-6, atol=1e-6)
    finally:
        if wrap == "ddp":
            dist.destroy_process_group()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("pool, index", [("lora_A", (4, 0)), ("lora_B", (1, 0))])
def test_pools_of_a_diverged_run_are_refused_and_the_saved_files_kept(tmp_path, bad, pool, index):
    """save_adapter wrote NaN/inf pools, atomically over a good file, and load_adapter then refused
    that file; export_peft wrote them too."""
    from lorambo import export_peft

    model = trained()
    save_adapter(model, tmp_path / "a")
    export_peft(model, tmp_path / "p")
    before = {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()}
    with torch.no_grad():
        getattr(lora_layers(model)["2"], pool)[index] = bad  # inside the active slice of rank 5
    for save, folder in ((save_adapter, "a"), (export_peft, "p")):
        with pytest.raises(RuntimeError, match=rf"{save.__name__}: {pool} of layer '2' holds 1 NaN/inf values of "
                                               rf"{5 * 16 if pool == 'lora_A' else 12 * 5}.*nothing was written"):
            save(model, tmp_path / folder)
    assert {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()} == before


def test_a_module_to_save_of_a_diverged_run_is_refused_and_the_saved_files_kept(tmp_path):
    """load_adapter refuses a file whose module to save holds NaN/inf in a parameter; both savers
    wrote such a file, atomically over a good one."""
    from lorambo import export_peft

    model = configure_model(net(), {"0": 3}, capacity={"0": 8}, modules_to_save=["4"])
    save_adapter(model, tmp_path / "a")
    export_peft(model, tmp_path / "p")
    before = {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()}
    with torch.no_grad():
        model[4].bias[2] = float("nan")
    for save, folder in ((save_adapter, "a"), (export_peft, "p")):
        with pytest.raises(RuntimeError, match=rf"{save.__name__}: parameter 'bias' of module to save '4' holds 1 "
                                               r"NaN/inf values of 4.*nothing was written"):
            save(model, tmp_path / folder)
    assert {f: f.read_bytes() for f in sorted(tmp_path.rglob("*")) if f.is_file()} == before


@pytest.mark.parametrize("head, error", [
    (lambda: nn.Linear(12, 4, bias=False),
     r"module to save '4' has state keys \['bias', 'weight'\] in the file and \['weight'\] in the model"),
    (lambda: nn.Linear(12, 5),
     r"4\.(weight|bias) has shape \(4(, 12)?,?\) in the file and \(5(, 12)?,?\) in the model"),
], ids=["keys", "shape"])
def test_a_module_to_save_that_does_not_fit_is_refused_by_name_and_nothing_changes(tmp_path, head, error):
    """The file's module to save has other state keys or shapes than the model's: refused before
    anything is changed (the model stays plain), naming the module and what differs."""
    model = configure_model(net(), {"0": 3}, capacity={"0": 8}, modules_to_save=["4"])
    file = save_adapter(model, tmp_path)
    plain = net()
    plain[4] = head()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(ValueError, match=error):
        load_adapter(plain, file)
    assert lora_layers(plain) == {} and all(p.requires_grad for p in plain.parameters())
    assert plain.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in plain.state_dict().items())
