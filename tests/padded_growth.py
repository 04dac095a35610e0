"""One online growth decision of LoRAMBoOptimizer on MiniLM batches, for the padding tests."""

import copy

import torch

from lorambo.optimizer import LoRAMBoOptimizer

MODULES = ["encoder.layer.0.attention.self.query", "encoder.layer.2.attention.self.value",
           "encoder.layer.5.output.dense"]
# 3 ranks of the 384 x 384 layers or one of the 1536 x 384 one: growth must choose
BUDGET = 768 + 768 + 1920 + 2500


def sentence_sum_loss(model, batch):
    """Sum over sentences of a loss on each one's masked-mean embedding: pads get no gradient,
    and splitting the sentences into batches only splits the sum."""
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return ((hidden * mask).sum(1) / mask.sum(1)).pow(2).sum()


def allocator(base, **kwargs):
    model = copy.deepcopy(base)
    opt = LoRAMBoOptimizer(model, BUDGET, sensitivity_method="frobenius", target_modules=MODULES, capacity=8,
                           interval=1, sketch_rank=3, seed=0, **kwargs)
    torch.manual_seed(0)  # the initial rows of A
    opt.configure({n: 1 for n in MODULES})
    return opt


def decide(base, batches, pass_batch=True, **kwargs):
    """(decision records, new rows of A per layer, captured (X, dY) per layer) of one decision."""
    opt = allocator(base, **kwargs)
    for batch in batches:
        with opt.capture(0, batch if pass_batch else None):
            sentence_sum_loss(opt.model, batch).backward()
    pairs = {n: [(x.clone(), dy.clone()) for x, dy in opt.online.capture.pairs(n)] for n in MODULES}
    records = opt.step(0)
    rows = {n: m.lora_A[:m.rank].detach().clone() for n, m in opt.layers().items()}
    return records, rows, pairs


def assert_same_decision(got, want):
    (records, rows, _), (want_records, want_rows, _) = got, want
    assert [(r["layer"], r["old_rank"], r["new_rank"]) for r in records] == \
           [(r["layer"], r["old_rank"], r["new_rank"]) for r in want_records]
    for r, w in zip(records, want_records):
        torch.testing.assert_close(torch.tensor(r["gains"]), torch.tensor(w["gains"]), rtol=1e-7, atol=0)
    for n in MODULES:  # every element of every row of A, new ones included
        torch.testing.assert_close(rows[n], want_rows[n], rtol=1e-7, atol=1e-10, msg=n)


