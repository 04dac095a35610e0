"""Trainer's end-of-training flows with LoRAMBoCallback on a tiny GPT-2.

``load_best_model_at_end`` with ``save_total_limit``: the best checkpoint was saved before ranks
grew and moved, so Trainer ends with that model at its ranks, and the callback's decisions,
decision log and importance averages describe it too, not the last step's ranks. Reference: the
ranks, outputs, decisions and importance recorded when that checkpoint was saved.

``evaluate()`` every step: evaluation runs between decision steps under ``no_grad``, so the
decisions and the trained weights are bit for bit those of a run without evaluation (without
dropout: any DataLoader iteration, evaluation's too, draws from torch's RNG, which a dropout
mask then sees differently, with or without lorambo)."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.allocation.report import read_decisions  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def _setup(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    lorambo.configure_model(model, 1, target_modules=["c_attn", "c_fc"], capacity=4)
    spent = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    # decisions at steps 1 (growth) and 3 (moves, scored by the importance averages)
    allocator = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=1, interval=2, sketch_rank=2,
                                 move_threshold=1e30, log_path=tmp_path / "decisions.jsonl")
    gen = torch.Generator().manual_seed(1)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,), generator=gen)), "labels": ids,
             "attention_mask": (torch.arange(12) < 6 + i % 6).long()} for i in range(24)]
    callback = LoRAMBoCallback(allocator, importance=AdaLoRAImportance(model))
    return model, allocator, callback, data


def _args(tmp_path, **kwargs):
    return transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=5,
                                          learning_rate=5e-2, report_to=[], use_cpu=True, logging_steps=1,
                                          disable_tqdm=True, dataloader_num_workers=0, **kwargs)


class _Record(transformers.TrainerCallback):
    """At every save: ranks, outputs on a probe batch, decisions and importance averages."""

    def __init__(self, callback, probe):
        self.callback, self.probe, self.saved = callback, probe, {}

    def on_save(self, args, state, control, model=None, **kwargs):
        with torch.no_grad():
            training = model.training
            model.eval()
            logits = model(self.probe).logits.clone()
            model.train(training)
        self.saved[state.global_step] = ({n: m.rank for n, m in lorambo.lora_layers(model).items()},
                                         logits, copy.deepcopy(self.callback.decisions),
                                         copy.deepcopy(self.callback.importance.state_dict()))


def test_best_model_at_end_brings_its_ranks_and_the_callback_state_with_it(tmp_path):
    model, allocator, callback, data = _setup(tmp_path)
    evaluations = []

    def second_evaluation_is_best(_):  # checkpoint-2: after the growth at step 1, before the moves at 3
        evaluations.append(None)
        return {"picked": float(len(evaluations) == 2)}

    record = _Record(callback, torch.randint(0, 40, (2, 12), generator=torch.Generator().manual_seed(3)))
    args = _args(tmp_path, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
                 save_total_limit=1, load_best_model_at_end=True, metric_for_best_model="picked",
                 greater_is_better=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                                   callbacks=[callback, record], compute_metrics=second_evaluation_is_best,
                                   optimizers=(allocator.make_optimizer(lr=5e-2), None))
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-2")
    ranks, logits, decisions, importance = record.saved[2]
    final_ranks, _, final_decisions, _ = record.saved[5]
    assert ranks != final_ranks and len(decisions) < len(final_decisions)  # the run went on past the best
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(record.probe).logits, logits, rtol=0, atol=0)
    assert {n: m.rank for n, m in lorambo.lora_layers(model).items()} == ranks
    assert callback.decisions == decisions  # before, the last step's decisions stayed
    assert read_decisions(tmp_path / "decisions.jsonl") == decisions
    now = callback.importance.state_dict()
    assert now["steps"] == importance["steps"] == 2
    for stat in ("ibar", "ubar"):
        assert now[stat].keys() == importance[stat].keys()
        for key, value in importance[stat].items():
            assert torch.equal(now[stat][key], value), (stat, key)


def _train(tmp_path, evaluate):
    model, allocator, callback, data = _setup(tmp_path)
    args = _args(tmp_path, gradient_accumulation_steps=2, save_strategy="no",
                 eval_strategy="steps" if evaluate else "no", eval_steps=1)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                                   callbacks=[callback], optimizers=(allocator.make_optimizer(lr=5e-2), None))
    trainer.train()
    return callback.decisions, model.state_dict()


def test_evaluation_every_step_leaves_decisions_and_weights_alone(tmp_path):
    decisions, weights = _train(tmp_path / "plain", evaluate=False)
    with_eval, weights_eval = _train(tmp_path / "eval", evaluate=True)
    assert {r["event"] for r in decisions} == {"grow", "shrink"}
    assert with_eval == decisions  # gains and scores included
    assert weights.keys() == weights_eval.keys()
    for key, value in weights.items():
        assert torch.equal(weights_eval[key], value), key


def test_a_best_checkpoint_trainer_could_not_load_leaves_the_callback_state_with_a_warning(tmp_path):
    from types import SimpleNamespace

    from lorambo.integrations import checkpoint

    model, allocator, callback, _ = _setup(tmp_path)
    callback.decisions = [{"step": 1, "event": "grow"}]
    args = SimpleNamespace(load_best_model_at_end=True)
    (tmp_path / "checkpoint-2").mkdir()
    state = SimpleNamespace(best_model_checkpoint=str(tmp_path / "checkpoint-2"))
    with pytest.warns(UserWarning, match=r"checkpoint-2, which has no lorambo_state.pt; callback.decisions"):
        callback.on_train_end(args, state, None)
    saved = checkpoint.callback_state(allocator, callback.importance, [])
    saved["ranks"] = {n: 2 for n in saved["ranks"]}  # the model Trainer did not load
    checkpoint.save_callback_state(tmp_path / "checkpoint-2", saved)
    with pytest.warns(UserWarning, match=r"the model's ranks are not those of the best checkpoint .*checkpoint-2"):
        callback.on_train_end(args, state, None)
    assert callback.decisions == [{"step": 1, "event": "grow"}]
