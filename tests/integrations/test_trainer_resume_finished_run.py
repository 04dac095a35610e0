"""Resuming a Trainer run from its final checkpoint with LoRAMBoCallback takes as many more
optimizer steps as plain transformers does on the same run (none, where max_steps ends an
epoch), and leaves the model, ranks, decisions and decision log as the finished run left them.
(Where max_steps ends mid-epoch, transformers 5.23 itself takes one more step on resuming, with
or without lorambo.)"""

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.allocation.report import read_decisions  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(out, max_steps, use_lorambo, resume=None):
    """(optimizer steps taken, the model's tensors, the callback or None)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model, callbacks = transformers.GPT2LMHeadModel(cfg), []
    if use_lorambo:
        model = lorambo.configure_model(model, 1, target_modules=["c_attn"], capacity=4)
        allocator = LoRAMBoOptimizer(model, total_budget=10**6, warmup_steps=1, interval=1, sketch_rank=2,
                                     log_path=out / "decisions.jsonl", seed=3)
        callbacks = [LoRAMBoCallback(allocator)]
        optimizer = allocator.make_optimizer(lr=1e-2)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    steps = []
    optimizer.register_step_post_hook(lambda *a: steps.append(1))
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,), generator=g)), "labels": ids} for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=1e-2,
        lr_scheduler_type="constant", report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks,
                                   optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return len(steps), {k: v.clone() for k, v in model.state_dict().items()}, (callbacks or [None])[0]


def test_resuming_the_final_checkpoint_does_nothing_more_like_plain_transformers(tmp_path):
    max_steps = 4  # one epoch: plain transformers takes no step when resumed there
    plain = _run(tmp_path / "plain", max_steps, False, resume=None)[0], \
        _run(tmp_path / "plain", max_steps, False, resume=str(tmp_path / "plain" / f"checkpoint-{max_steps}"))[0]

    out = tmp_path / "lorambo"
    first, tensors, callback = _run(out, max_steps, True)
    log = read_decisions(out / "decisions.jsonl")
    again, resumed, resumed_callback = _run(out, max_steps, True, resume=str(out / f"checkpoint-{max_steps}"))
    assert (first, again) == plain == (max_steps, 0)
    assert callback.decisions and resumed_callback.decisions == callback.decisions
    assert read_decisions(out / "decisions.jsonl") == log
    assert resumed.keys() == tensors.keys()
    for key, value in tensors.items():
        assert torch.equal(resumed[key], value), key
