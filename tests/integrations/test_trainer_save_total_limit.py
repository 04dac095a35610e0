"""What docs/interop.md's "Keep save_total_limit >= 2" rests on, in the installed transformers: Trainer
deletes the checkpoints beyond ``save_total_limit`` before callbacks' ``on_save`` runs, so a run
killed inside LoRAMBoCallback.on_save (simulated: it raises at step 4) with ``save_total_limit=1``
has no complete checkpoint left, and with 2 keeps checkpoint-2 complete, which the resume error
names. Should transformers ever write callbacks' files before its rotation, this fails and the
docs/interop.md paragraph can go."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.integrations.checkpoint import STATE_FILE, complete_checkpoints  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


class _Killed(Exception):
    pass


def _run_killed_while_saving_step_4(tmp_path, limit, monkeypatch):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    lorambo.configure_model(model, 1, target_modules=["c_attn"], capacity=2)
    allocator = lorambo.LoRAMBoOptimizer(model, total_budget=10_000)
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 40, (8,), generator=gen)), "labels": ids} for _ in range(16)]
    real = LoRAMBoCallback.on_save

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == 4:
            raise _Killed
        return real(self, args, state, control, **kwargs)

    monkeypatch.setattr(LoRAMBoCallback, "on_save", on_save)
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4,
                                          save_steps=2, save_total_limit=limit, learning_rate=1e-2, report_to=[],
                                          use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(allocator.make_optimizer(lr=1e-2), None),
                                   callbacks=[LoRAMBoCallback(allocator)])
    with pytest.raises(_Killed):
        trainer.train()
    return sorted(p.name for p in tmp_path.glob("checkpoint-*")), complete_checkpoints(tmp_path, before=4)


def test_save_total_limit_1_leaves_no_complete_checkpoint(tmp_path, monkeypatch):
    folders, complete = _run_killed_while_saving_step_4(tmp_path, 1, monkeypatch)
    assert folders == ["checkpoint-4"] and complete == []
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").is_file()
    assert not (tmp_path / "checkpoint-4" / STATE_FILE).exists()


def test_save_total_limit_2_keeps_the_previous_complete_one(tmp_path, monkeypatch):
    folders, complete = _run_killed_while_saving_step_4(tmp_path, 2, monkeypatch)
    assert folders == ["checkpoint-2", "checkpoint-4"] and complete == [str(tmp_path / "checkpoint-2")]
    assert (tmp_path / "checkpoint-2" / "adapter.safetensors").is_file()
