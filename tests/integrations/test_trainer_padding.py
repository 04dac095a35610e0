"""LoRAMBoCallback hands each Trainer batch to the allocator: a decision step on real left-padded
MiniLM batches grows the same ranks, with the same new rows of A, as a plain loop that captures
one unpadded sentence at a time."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from minilm_batches import TEXTS, encode, load  # noqa: E402
from padded_growth import allocator, assert_same_decision, decide, sentence_sum_loss  # noqa: E402


class _WithLoss(torch.nn.Module):
    """What Trainer needs: a model called as model(**batch) that returns its loss (times the
    micro-batches per step, which Trainer divides it by: the step's gradient is the plain loop's)."""

    def __init__(self, bert, micro_batches):
        super().__init__()
        self.bert, self.micro_batches = bert, micro_batches

    def forward(self, **batch):
        return {"loss": sentence_sum_loss(self.bert, batch) * self.micro_batches}


def test_callback_keeps_pads_out_of_the_capture(tmp_path):
    torch.set_num_threads(1)
    model, tokenizer = load(torch.float64)
    want = decide(model, [encode(tokenizer, [t]) for t in TEXTS], pass_batch=False)
    batches = [encode(tokenizer, TEXTS[:1], "left"), encode(tokenizer, TEXTS[1:], "left")]
    assert bool((batches[1]["attention_mask"] == 0).any())
    opt = allocator(model)
    for m in opt.model.modules():  # Trainer trains in train mode: the same function as eval
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = {}
    callback = LoRAMBoCallback(opt)
    callback.on_step_end = lambda *a, **k: rows.update(  # after the decision, before anything else reads A
        {n: m.lora_A[:m.rank].detach().clone() for n, m in opt.layers().items()})
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                                          gradient_accumulation_steps=len(batches), max_steps=1, learning_rate=0.0,
                                          report_to="none", use_cpu=True, save_strategy="no",
                                          disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=_WithLoss(opt.model, len(batches)), args=args, train_dataset=[0, 1],
                                   data_collator=lambda items: batches[items[0]], callbacks=[callback],
                                   optimizers=(opt.make_optimizer(lr=0.0), None))
    trainer.train()
    assert_same_decision((callback.decisions, rows, None), want)
    assert not opt.model._forward_pre_hooks
