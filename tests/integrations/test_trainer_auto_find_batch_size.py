"""LoRAMBoCallback under ``auto_find_batch_size``: after an out-of-memory error accelerate reruns
Trainer's inner loop with a smaller batch (90%), and its step numbers start at 0 again on the model
(ranks and weights) the failed attempt left. The allocator still remembered the failed attempt's
last decision step and refused the retry's decision at that step number as a repeat (warning
about gradient accumulation). The reference is a fresh allocator and callback on a copy of the
model the retry starts from, trained at the retry's batch size."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402


class _OutOfMemoryOnce(transformers.GPT2LMHeadModel):
    """Raises CUDA's out-of-memory error on its ``oom_call``-th training forward of a 4-row batch."""

    oom_call = None

    def forward(self, **batch):
        if self.oom_call is not None and torch.is_grad_enabled() and batch["input_ids"].shape[0] == 4:
            self.oom_call -= 1
            if self.oom_call == 0:
                raise RuntimeError("CUDA out of memory. (simulated)")
        return super().forward(**batch)


class _SnapshotAtRetry(transformers.TrainerCallback):
    """A copy of the model as the second run of the inner loop (the retry) begins."""

    def __init__(self, model):
        self.model, self.begins, self.copy = model, 0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.begins += 1
        if self.begins == 2:
            self.copy = copy.deepcopy(self.model)


def _train(model, callbacks, batch_size, auto, tmp_path):
    allocator = LoRAMBoOptimizer(model, total_budget=sum(4 * (m.in_features + m.out_features) for m in
                                                         lorambo.lora_layers(model).values()),
                                 warmup_steps=1, interval=2, sketch_rank=2)
    callback = LoRAMBoCallback(allocator)
    ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": ids, "labels": ids}] * 24  # one example: the retry's data order cannot matter
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=batch_size,
                                          auto_find_batch_size=auto, max_steps=4, learning_rate=0.0,
                                          report_to="none", use_cpu=True, save_strategy="no",
                                          remove_unused_columns=False, disable_tqdm=True,
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback, *callbacks],
                                   optimizers=(allocator.make_optimizer(lr=0.0), None))
    trainer.train()
    return callback.decisions


def test_the_retry_after_an_out_of_memory_error_decides_at_the_failed_attempts_decision_step(tmp_path):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = _OutOfMemoryOnce(cfg).double()
    lorambo.configure_model(model, 1, target_modules=["c_attn", "c_fc"], capacity=4)
    model.oom_call = 3  # step 2's forward: after step 1 grew the ranks
    snapshot = _SnapshotAtRetry(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "step 1 has changed ranks already"
        decisions = _train(model, [snapshot], 4, True, tmp_path / "retry")
    assert snapshot.begins == 2 and model.oom_call == 0
    failed = [r for r in decisions if r["step"] == 1][:len(lorambo.lora_layers(model))]
    assert failed and all(r["new_rank"] == 3 for r in failed)  # the failed attempt's step 1
    retry = decisions[len(failed):]
    reference = snapshot.copy
    reference.oom_call = None
    want = _train(reference, [], 3, False, tmp_path / "reference")  # accelerate retries at 90%
    assert want and [r["step"] for r in want] == [1] * len(want)
    measured = ("benefit", "gains")  # the sketches of the two runs draw other random numbers: equal to ~1e-8

    def exact(records):
        return [{k: v for k, v in r.items() if k not in measured} for r in records]

    assert exact(retry) == exact(want)
    for got, ref in zip(retry, want):
        assert got["gains"] == pytest.approx(ref["gains"], rel=1e-5)
    assert {n: m.rank for n, m in lorambo.lora_layers(model).items()} == \
           {n: m.rank for n, m in lorambo.lora_layers(reference).items()}


def test_a_decision_stopped_by_out_of_memory_is_followed_by_the_importance_and_the_log(tmp_path, monkeypatch):
    """An out-of-memory error part-way through a decision (here: the third layer's grow) keeps the
    rank changes made before it, in the allocator's log. The callback took neither them into the
    AdaLoRA importance averages nor into callback.decisions, so the retry's first importance
    update raised (the slots changed behind it). Now the retry trains on, and replaying
    callback.decisions (equal to the allocator's log) from rank 1 gives the model's ranks."""
    from lorambo.nn.lora_linear import LoRAMBoLinear
    from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    lorambo.configure_model(model, 1, target_modules=["c_attn", "c_fc"], capacity=4)
    layers = lorambo.lora_layers(model)
    victim, set_rank, failures = list(layers.values())[2], LoRAMBoLinear.set_rank, []

    def set_rank_out_of_memory_once(self, *args, **kwargs):
        if self is victim and not failures:
            failures.append(self)
            raise RuntimeError("CUDA out of memory. (simulated)")
        return set_rank(self, *args, **kwargs)

    monkeypatch.setattr(LoRAMBoLinear, "set_rank", set_rank_out_of_memory_once)
    allocator = LoRAMBoOptimizer(model, total_budget=sum(4 * (m.in_features + m.out_features)
                                                         for m in layers.values()),
                                 warmup_steps=1, interval=2, sketch_rank=2)
    callback = LoRAMBoCallback(allocator, importance=AdaLoRAImportance(model))
    ids = torch.randint(0, 40, (12,), generator=torch.Generator().manual_seed(1))
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          auto_find_batch_size=True, max_steps=4, learning_rate=1e-2,
                                          report_to="none", use_cpu=True, save_strategy="no",
                                          remove_unused_columns=False, disable_tqdm=True,
                                          dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=[{"input_ids": ids, "labels": ids}] * 24,
                                   callbacks=[callback], optimizers=(allocator.make_optimizer(lr=1e-2), None))
    trainer.train()
    assert failures and trainer._train_batch_size == 3  # accelerate retries at 90%
    kept = allocator.decisions[:2]
    assert [r["layer"] for r in kept] == list(layers)[:2] and all(r["step"] == 1 for r in kept)
    assert callback.decisions == allocator.decisions
    replay = {name: 1 for name in layers}
    for rec in callback.decisions:
        assert rec["old_rank"] == replay[rec["layer"]]
        replay[rec["layer"]] = rec["new_rank"]
    assert replay == {name: layer.rank for name, layer in layers.items()}
