"""Warnings raised inside Trainer's loop point at the user's trainer.train() line."""

import warnings

import pytest
import torch
from torch.utils.weak import WeakIdKeyDictionary

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.nn import optimizer_state  # noqa: E402


def test_callback_warnings_point_at_trainer_train(tmp_path, monkeypatch):
    """They pointed into transformers' trainer.py / trainer_callback.py (the frame that called
    the callback), so filterwarnings(module=<the user's module>) missed them."""
    monkeypatch.setattr(optimizer_state, "_WARNED_SHARED_STEP", WeakIdKeyDictionary())  # once per optimizer
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    lorambo.configure_model(model, 1, target_modules=["c_attn"], capacity=4)
    opt = lorambo.LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=1, interval=1, sketch_rank=2)
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,), generator=g)), "labels": ids} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                                          learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[LoRAMBoCallback(opt)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()  # Trainer's default torch AdamW: the callback and the growth warn
    ours = [w for w in caught if "LoRAMBoCallback: Trainer's optimizer" in str(w.message)
            or "keeps one step count per parameter" in str(w.message)]
    assert len(ours) >= 2, [(w.filename, str(w.message)[:60]) for w in caught]
    assert {w.filename for w in ours} == {__file__}, [(w.filename, str(w.message)[:60]) for w in ours]
