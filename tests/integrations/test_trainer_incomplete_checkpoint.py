"""A run killed while saving a checkpoint leaves Trainer's files in ``checkpoint-N`` without
LoRAMBoCallback's (it writes after Trainer), and ``resume_from_checkpoint=True`` picks that folder.
The error used to say only "pass LoRAMBoCallback(..., resume_from=<checkpoint folder>)", which
would pair the step-N model with an earlier step's decisions; it now says the checkpoint is
incomplete and names the last complete one to resume from (a MiniLM Trainer run killed in
``on_save`` at step 8, resumed from checkpoint-4 as told, ends bit for bit as the uninterrupted run).
The callback is called as Trainer calls it at the start of a resumed run."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import lorambo
from lorambo.integrations import LoRAMBoCallback
from lorambo.integrations.checkpoint import STATE_FILE


def callback(resume_from=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 4))
    lorambo.configure_model(model, 2, capacity=4)
    return LoRAMBoCallback(lorambo.LoRAMBoOptimizer(model, 1000, interval=2), resume_from=resume_from)


def checkpoint(root, step, complete):
    folder = root / f"checkpoint-{step}"
    folder.mkdir()
    (folder / "trainer_state.json").write_text("{}")
    if complete:
        (folder / STATE_FILE).write_bytes(b"")  # only its presence counts here
    return folder


def resume_at(cb, root, step):
    cb.on_train_begin(SimpleNamespace(output_dir=str(root)), SimpleNamespace(global_step=step), None)


def test_an_incomplete_checkpoint_names_the_last_complete_one(tmp_path):
    checkpoint(tmp_path, 2, complete=True)
    last = checkpoint(tmp_path, 4, complete=True)
    checkpoint(tmp_path, 10, complete=True)  # later than the resumed step: not a way back
    broken = checkpoint(tmp_path, 8, complete=False)
    with pytest.raises(FileNotFoundError, match="incomplete") as err:
        resume_at(callback(), tmp_path, 8)
    message = str(err.value)
    assert f"resume_from_checkpoint={str(last)!r}" in message and f"remove {broken}" in message


def test_no_complete_checkpoint_before_it(tmp_path):
    broken = checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(FileNotFoundError, match=f"incomplete.*an earlier complete checkpoint, or remove {broken}"):
        resume_at(callback(), tmp_path, 4)


def test_resume_from_elsewhere_keeps_its_message(tmp_path):
    checkpoint(tmp_path, 4, complete=False)
    with pytest.raises(FileNotFoundError, match=r"no lorambo_state.pt in checkpoint .*elsewhere: pass "
                                                 r"LoRAMBoCallback\(\.\.\., resume_from=<checkpoint folder>\)"):
        resume_at(callback(resume_from=str(tmp_path / "elsewhere")), tmp_path, 4)


def test_resume_from_a_folder_elsewhere_restores_from_it(tmp_path):
    """lorambo's files of the resumed step kept elsewhere (Trainer's own checkpoint-N lacks them):
    ``resume_from`` is where they are read from, adapter included, not the default folder."""
    saved = callback()
    with torch.no_grad():
        for layer in lorambo.lora_layers(saved.allocator.model).values():
            layer.lora_B[:, :layer.rank].normal_(generator=torch.Generator().manual_seed(7))
    saved.on_save(SimpleNamespace(output_dir=str(tmp_path / "run"), should_save=True),
                  SimpleNamespace(global_step=4), None)
    elsewhere = (tmp_path / "run" / "checkpoint-4").rename(tmp_path / "elsewhere")
    (tmp_path / "run").rename(tmp_path / "resumed")
    checkpoint(tmp_path / "resumed", 4, complete=False)  # Trainer's files only
    resumed = callback(resume_from=str(elsewhere))
    with pytest.warns(UserWarning, match="restored from .*elsewhere"):
        resume_at(resumed, tmp_path / "resumed", 4)
    want = lorambo.lora_layers(saved.allocator.model)
    for name, layer in lorambo.lora_layers(resumed.allocator.model).items():
        torch.testing.assert_close(layer.lora_B, want[name].lora_B, rtol=0, atol=0)
        torch.testing.assert_close(layer.lora_A, want[name].lora_A, rtol=0, atol=0)
