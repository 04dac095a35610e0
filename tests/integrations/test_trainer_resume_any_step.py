"""Trainer resumed from the checkpoint right after a rank decision, right before one and one
steps after one (online growth with rank moves scored by AdaLoRA importance, gradient
accumulation, lorambo.optim.AdamW, LoRA dropout), and from the last checkpoint that
``save_total_limit=2`` keeps: the run goes on as the one that never stopped, bit for bit
(decisions, decision log, ranks, every tensor of the model, optimizer state, importance).
``test_trainer_resume.py`` resumes at one step between decisions, without dropout."""

import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.allocation.report import read_decisions  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 7  # decisions at global steps 1, 3, 5: checkpoint-k is saved before step k runs


def _run(out, log, resume=None, limit=None):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = lorambo.configure_model(transformers.GPT2LMHeadModel(cfg), 1, target_modules=["c_attn", "c_fc"],
                                    capacity=4, dropout=0.1)
    spent = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    allocator = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=1, interval=2, sketch_rank=2,
                                 move_threshold=1e30, log_path=log, seed=3)
    g = torch.Generator().manual_seed(5)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,), generator=g)), "labels": ids} for _ in range(64)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=STEPS,
        learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="steps", save_steps=1,
        save_total_limit=limit, logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
        lr_scheduler_type="linear")
    importance = AdaLoRAImportance(model)
    callback = LoRAMBoCallback(allocator, importance=importance)
    optimizer = allocator.make_optimizer(lr=1e-2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                                   optimizers=(optimizer, None))
    trainer.train(resume_from_checkpoint=resume)
    return model, optimizer, callback, importance


def _assert_same(got, want):
    (model, optimizer, callback, importance), (r_model, r_optimizer, r_callback, r_importance) = got, want
    assert callback.decisions == r_callback.decisions
    assert {n: m.rank for n, m in lorambo.lora_layers(model).items()} == \
        {n: m.rank for n, m in lorambo.lora_layers(r_model).items()}
    want_state = r_model.state_dict()
    for key, value in model.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, want_state[key]), key
    for p, q in zip(model.parameters(), r_model.parameters(), strict=True):
        a, b = optimizer.state.get(p, {}), r_optimizer.state.get(q, {})
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k
    a, b = importance.state_dict(), r_importance.state_dict()
    assert a["steps"] == b["steps"]
    for table in ("ibar", "ubar"):
        assert a[table].keys() == b[table].keys()
        for k in a[table]:
            assert torch.equal(a[table][k], b[table][k]), (table, k)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    run = _run(out / "run", out / "decisions.jsonl")
    steps = {r["step"] for r in run[2].decisions}
    assert steps >= {1, 3, 5} and {r["event"] for r in run[2].decisions if r["step"] == 3} == {"grow", "shrink"}
    return out, run


@pytest.mark.parametrize("checkpoint", [2, 3, 4],
                         ids=["right-after-decision-1", "decision-3-first", "one-step-after-decision-3"])
def test_resume_around_a_decision(tmp_path, uninterrupted, checkpoint):
    ref_dir, ref = uninterrupted
    folder = tmp_path / f"checkpoint-{checkpoint}"
    shutil.copytree(ref_dir / "run" / folder.name, folder)
    log = tmp_path / "decisions.jsonl"
    shutil.copy(ref_dir / "decisions.jsonl", log)  # what the interrupted run logged after the checkpoint
    resumed = _run(tmp_path, log, resume=str(folder))
    _assert_same(resumed, ref)
    assert read_decisions(log) == ref[2].decisions


def test_resume_from_what_save_total_limit_keeps(tmp_path, uninterrupted):
    _, ref = uninterrupted
    log = tmp_path / "decisions.jsonl"
    _run(tmp_path, log, limit=2)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-7"]
    shutil.rmtree(tmp_path / "checkpoint-7")  # the run stopped before step 7's save
    resumed = _run(tmp_path, log, resume=True, limit=2)
    _assert_same(resumed, ref)
    assert read_decisions(log) == ref[2].decisions
