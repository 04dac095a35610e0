"""LoRAMBoCallback under reentrant activation checkpointing (``gradient_checkpointing_enable()``):
the checkpointed layers are captured when the backward recomputes them, with the token mask the
allocator holds then. The callback handed it every model call's batch, so a no_grad forward of
another batch between a micro-batch's forward and its backward (a teacher pass of the same model)
put that batch's mask there: the capture took the pads of the training batch as real tokens.
Calls without grad, which capture nothing, now leave the mask alone. The reference is the plain
loop's decision on one unpadded sentence at a time."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from minilm_batches import TEXTS, encode, load  # noqa: E402
from padded_growth import allocator, assert_same_decision, decide, sentence_sum_loss  # noqa: E402


class _WithTeacherPass(torch.nn.Module):
    """model(**batch) -> its loss, after which the same model runs the batch's tokens without
    padding mask under no_grad (another batch of the same shape, as a teacher pass would)."""

    def __init__(self, bert, micro_batches):
        super().__init__()
        self.bert, self.micro_batches = bert, micro_batches

    def forward(self, **batch):
        loss = sentence_sum_loss(self.bert, batch) * self.micro_batches
        with torch.no_grad():
            self.bert(**{**batch, "attention_mask": torch.ones_like(batch["attention_mask"])})
        return {"loss": loss}


def test_a_no_grad_model_call_before_the_backward_leaves_the_capture_mask_alone(tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = load(torch.float64)
    want = decide(model, [encode(tokenizer, [t]) for t in TEXTS], pass_batch=False)
    batches = [encode(tokenizer, TEXTS[:1], "right"), encode(tokenizer, TEXTS[1:], "right")]
    assert bool((batches[1]["attention_mask"] == 0).any())
    opt = allocator(model)
    for m in opt.model.modules():  # Trainer trains in train mode: the same function as eval
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    opt.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    rows = {}
    callback = LoRAMBoCallback(opt)
    callback.on_step_end = lambda *a, **k: rows.update(  # after the decision, before anything else reads A
        {n: m.lora_A[:m.rank].detach().clone() for n, m in opt.layers().items()})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                                          gradient_accumulation_steps=len(batches), max_steps=1, learning_rate=0.0,
                                          report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=_WithTeacherPass(opt.model, len(batches)), args=args, train_dataset=[0, 1],
                                   data_collator=lambda items: batches[items[0]], callbacks=[callback],
                                   optimizers=(opt.make_optimizer(lr=0.0), None))
    trainer.train()
    assert_same_decision((callback.decisions, rows, None), want)
