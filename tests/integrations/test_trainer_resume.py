"""Trainer checkpoints with LoRAMBoCallback: a resumed run with online growth and rank moves is the
uninterrupted run (same losses, decisions, ranks, pools and lorambo.optim.AdamW state)."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.allocation.report import read_decisions  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance  # noqa: E402

STEPS, SAVE_AT = 8, 4


def _base():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


class _Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses[state.global_step] = logs["loss"]


def _run(out, resume=None, log_path=None):
    torch.set_num_threads(1)
    model = lorambo.configure_model(_base(), 1, target_modules=["c_attn", "c_fc"], capacity=4)
    spent = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    alloc = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=1, interval=2, sketch_rank=2,
                             move_threshold=1e30, log_path=log_path, seed=3)
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,), generator=g)), "labels": ids} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="steps", save_steps=SAVE_AT,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, lr_scheduler_type="linear")
    callback, losses = LoRAMBoCallback(alloc, importance=AdaLoRAImportance(model)), _Losses()
    optimizer = alloc.make_optimizer(lr=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, losses],
                                   optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer, callback, losses.losses


def test_resumed_run_equals_uninterrupted(tmp_path):
    log = tmp_path / "decisions.jsonl"
    model, optimizer, callback, losses = _run(tmp_path / "run", log_path=log)
    assert any(r["step"] > SAVE_AT and r["event"] == "shrink" for r in callback.decisions)
    assert any(r["step"] > SAVE_AT and r["event"] == "grow" for r in callback.decisions)
    full_log = read_decisions(log)
    assert full_log == callback.decisions

    resumed, r_optimizer, r_callback, r_losses = _run(tmp_path / "run", resume=str(tmp_path / "run/checkpoint-4"),
                                                      log_path=log)
    assert sorted(r_losses) == list(range(SAVE_AT + 1, STEPS + 1))
    for step, loss in r_losses.items():
        assert abs(loss - losses[step]) <= 1e-6, step
    assert r_callback.decisions == callback.decisions and read_decisions(log) == full_log
    assert {n: m.rank for n, m in lorambo.lora_layers(resumed).items()} == \
        {n: m.rank for n, m in lorambo.lora_layers(model).items()}
    for key, value in model.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key
    params, r_params = list(model.parameters()), list(resumed.parameters())
    for p, q in zip(params, r_params):
        a, b = optimizer.state.get(p, {}), r_optimizer.state.get(q, {})
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    assert any("slot_step" in str(k) for s in r_optimizer.state.values() for k in s)

    # every checkpoint holds the adapter: it rebuilds the model on a fresh base
    reloaded = lorambo.load_adapter(_base(), tmp_path / "run/checkpoint-8")
    ids = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, resumed(input_ids=ids).logits, rtol=0, atol=0)

    # a checkpoint without lorambo's state is refused, not resumed with different decisions
    (tmp_path / "run/checkpoint-4/lorambo_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="resume_from"):
        _run(tmp_path / "run", resume=str(tmp_path / "run/checkpoint-4"))
