"""A Trainer run whose optimizer keeps its state where a rank change cannot reach it (a
hand-written Lion with its momentum in an attribute of its own) and whose LoRAMBoCallback shrinks
layers (rank moves): such a Lion keeps moving the dropped slots, which save_adapter refuses
("non-zero slots past the rank"), unless the inactive-slot step hook zeroes them. The checkpoint
after the shrink is written and holds the trained adapter."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance  # noqa: E402


class AttributeLion(torch.optim.Optimizer):
    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr))
        self.momentum = {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.momentum.setdefault(p, torch.zeros_like(p))
                p.add_((0.9 * m + 0.1 * p.grad).sign(), alpha=-group["lr"])
                m.mul_(0.99).add_(p.grad, alpha=0.01)


def test_a_checkpoint_after_a_shrink_is_written_with_the_trained_adapter(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    plain = copy.deepcopy(model)
    lorambo.configure_model(model, 2, target_modules=["c_attn", "c_fc"], capacity=4)
    spent = sum(2 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    allocator = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=1, interval=2, sketch_rank=2,
                                 move_threshold=1e30)
    callback = LoRAMBoCallback(allocator, importance=AdaLoRAImportance(model))
    lion = AttributeLion([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,))), "labels": ids} for _ in range(20)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5,
                                          report_to="none", use_cpu=True, save_strategy="steps", save_steps=5,
                                          disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                                   optimizers=(lion, None))
    trainer.train()  # the checkpoint at step 5 raised before
    assert any(r["event"] == "shrink" for r in callback.decisions)

    fresh = lorambo.load_adapter(plain, tmp_path / "checkpoint-5")
    ids = torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(1))
    model.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
