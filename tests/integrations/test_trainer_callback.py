"""A few Trainer steps on a tiny GPT-2 with LoRAMBoCallback: ranks change exactly as logged."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.allocation.report import read_decisions  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance  # noqa: E402


def test_pre_optimizer_step_event_exists():
    assert hasattr(transformers.TrainerCallback, "on_pre_optimizer_step")


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("moves", [False, True])
def test_callback_grows_ranks_as_logged(tmp_path, moves):
    torch.set_num_threads(1)
    model = _tiny_gpt2()
    lorambo.configure_model(model, 1, target_modules=["c_attn", "c_fc"], capacity=4)
    names = list(lorambo.lora_layers(model))
    log_path = tmp_path / "decisions.jsonl"
    spent = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    opt = LoRAMBoOptimizer(model, total_budget=spent, warmup_steps=1, interval=2, sketch_rank=2,
                           log_path=log_path, move_threshold=1e30 if moves else None)
    data = [{"input_ids": (ids := torch.randint(0, 40, (12,))), "labels": ids} for _ in range(24)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4,
                                          gradient_accumulation_steps=2, max_steps=5, learning_rate=1e-2,
                                          warmup_steps=2,  # the first step runs at learning rate 0
                                          report_to="none", use_cpu=True, save_strategy="no",
                                          logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    importance = AdaLoRAImportance(model) if moves else None
    callback = LoRAMBoCallback(opt, importance=importance)
    # with moves: lorambo's AdamW; without: Trainer's default torch AdamW, which gets a warning
    optimizers = (opt.make_optimizer(lr=1e-2), None) if moves else (None, None)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[callback],
                                   optimizers=optimizers)
    before = {n: 1 for n in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    warned = [w for w in caught if "LoRAMBoCallback: Trainer's optimizer" in str(w.message)]
    assert len(warned) == (0 if moves else 1)
    logged = read_decisions(log_path)
    assert logged == callback.decisions and logged
    assert {r["step"] for r in logged} <= {1, 3}
    replay = dict(before)
    for rec in logged:
        assert rec["old_rank"] == replay[rec["layer"]]
        replay[rec["layer"]] = rec["new_rank"]
    now = {n: m.rank for n, m in lorambo.lora_layers(model).items()}
    assert now == replay != before
    assert sum(opt.costs[n] * r for n, r in now.items()) <= spent
    assert not any(m._forward_hooks for m in lorambo.lora_layers(model).values())
    if moves:
        assert any(r["event"] == "shrink" for r in logged)


@pytest.mark.parametrize("should_save,world_zero", [(True, False), (False, True)])
def test_checkpoint_files_are_written_where_trainer_writes_checkpoints(tmp_path, should_save, world_zero):
    """With save_on_each_node, Trainer writes each node's checkpoint from the node's first process
    (args.should_save); the callback wrote only on world process 0, so other nodes' checkpoints
    lacked adapter.safetensors and lorambo_state.pt and resuming there failed."""
    from types import SimpleNamespace

    model = _tiny_gpt2()
    lorambo.configure_model(model, 1, target_modules=["c_attn"], capacity=4)
    callback = LoRAMBoCallback(LoRAMBoOptimizer(model, total_budget=1000))
    args = SimpleNamespace(output_dir=str(tmp_path), should_save=should_save)
    state = SimpleNamespace(global_step=3, is_world_process_zero=world_zero)
    callback.on_save(args, state, None)
    written = sorted(p.name for p in (tmp_path / "checkpoint-3").glob("*")) if should_save else []
    assert written == (["adapter.safetensors", "lorambo_state.pt"] if should_save else [])
    assert (tmp_path / "checkpoint-3").exists() == should_save


def test_a_run_after_an_interrupted_decision_step_decides_as_a_clean_one():
    """An error (or Ctrl-C) inside a decision step skips on_pre_optimizer_step and on_train_end:
    the batch hook and the capture stayed armed, and what they had captured went into the next
    run's first decision (its gains off by tens of percent here)."""
    import copy
    from types import SimpleNamespace

    model = _tiny_gpt2().double()
    lorambo.configure_model(model, 1, target_modules=["c_attn", "c_fc"], capacity=4)
    twin = copy.deepcopy(model)

    def batch():
        ids = torch.randint(0, 40, (2, 10))
        return {"input_ids": ids, "labels": ids, "attention_mask": torch.ones(2, 10, dtype=torch.long)}

    def run_step(model, callback, optimizer, step, batch):
        callback.on_step_begin(None, SimpleNamespace(global_step=step), None)
        model(**batch).loss.backward()
        callback.on_pre_optimizer_step(None, SimpleNamespace(global_step=step), None, optimizer=optimizer)

    def callback_for(model):
        allocator = LoRAMBoOptimizer(model, total_budget=10_000, warmup_steps=0, interval=1, sketch_rank=2)
        return allocator, LoRAMBoCallback(allocator), allocator.make_optimizer(lr=1e-2)

    allocator, callback, optimizer = callback_for(model)
    start = SimpleNamespace(global_step=0)
    callback.on_train_begin(None, start, None, optimizer=optimizer)
    callback.on_step_begin(None, SimpleNamespace(global_step=5), None)
    model(**batch()).loss.backward()  # a decision step's first micro-batch; then the run stops
    model.zero_grad()

    callback.on_train_begin(None, start, None, optimizer=optimizer)  # trainer.train() again
    assert not model._forward_pre_hooks_with_kwargs
    assert not any(m._forward_hooks for m in lorambo.lora_layers(model).values())
    clean_allocator, clean, clean_optimizer = callback_for(twin)
    clean.on_train_begin(None, start, None, optimizer=clean_optimizer)
    data = batch()
    run_step(model, callback, optimizer, 0, data)
    run_step(twin, clean, clean_optimizer, 0, data)
    assert callback.decisions and callback.decisions == clean.decisions
    for (name, layer), other in zip(lorambo.lora_layers(model).items(), lorambo.lora_layers(twin).values()):
        assert torch.equal(layer.lora_A, other.lora_A) and torch.equal(layer.lora_B, other.lora_B), name


@pytest.mark.parametrize("what", ["model", "torch optimizer"])
def test_something_else_in_place_of_the_allocator_is_refused(what):
    # before: accepted; the first optimizer step or save failed with an AttributeError
    model = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(6, 6)), 2)
    allocator = LoRAMBoOptimizer(model, total_budget=100)
    bad = model if what == "model" else allocator.make_optimizer()
    with pytest.raises(TypeError, match=rf"LoRAMBoCallback: allocator must be a lorambo.LoRAMBoOptimizer .*"
                                        rf"got {type(bad).__name__}"):
        LoRAMBoCallback(bad)
    with pytest.raises(TypeError, match=r"LoRAMBoCallback: importance must be a "
                                        r"lorambo.sensitivity.AdaLoRAImportance or None, got dict"):
        LoRAMBoCallback(allocator, importance={})


@pytest.mark.parametrize("argument, bad, message", [
    ("grad_scaler", 2.0, r"grad_scaler=2.0 must be a torch.amp.GradScaler or None"),
    ("resume_from", 500, r"resume_from must be a checkpoint folder \(a str or path\) or None, got int 500")])
def test_a_scaler_or_checkpoint_folder_of_the_wrong_kind_is_refused_when_built(argument, bad, message):
    # before: accepted; the scaler failed at the first decision step, a number as resume_from
    # only when Trainer resumed
    model = lorambo.configure_model(torch.nn.Sequential(torch.nn.Linear(6, 6)), 2)
    allocator = LoRAMBoOptimizer(model, total_budget=100)
    with pytest.raises(TypeError, match=rf"^LoRAMBoCallback: {message}"):
        LoRAMBoCallback(allocator, **{argument: bad})


def test_the_importance_averages_follow_a_decisions_shrink_and_growth():
    """A shrink record moves the kept components' AdaLoRA averages to the front (the removed
    one's gone, the freed tail zero); a grow record zeroes the averages of the new slots; every
    other entry stays, compared with the averages before the records."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6))
    lorambo.configure_model(net, 3, capacity=4)
    with torch.no_grad():
        for layer in lorambo.lora_layers(net).values():
            layer.lora_B.normal_()
    importance = AdaLoRAImportance(net)
    ((net(torch.randn(8, 5)) - torch.randn(8, 6)) ** 2).mean().backward()
    importance.update()
    before = {key: (importance._ibar[key].clone(), importance._ubar[key].clone()) for key in importance._ibar}
    assert all(float(i[:3].abs().min()) > 0 for i, _ in before.values() if i.dim() == 2 and i.shape[0] == 4)
    callback = LoRAMBoCallback(LoRAMBoOptimizer(net, 10**4, interval=2, sketch_rank=2), importance=importance)
    callback._follow([{"layer": "0", "event": "shrink", "old_rank": 3, "new_rank": 2, "components": [1]},
                      {"layer": "2", "event": "grow", "old_rank": 3, "new_rank": 4}])
    for (name, which), (ibar, ubar) in before.items():
        dim = 0 if which == "A" else 1
        for got, was in ((importance._ibar[(name, which)], ibar), (importance._ubar[(name, which)], ubar)):
            want = was.clone()
            if name == "0":  # components 0 and 2 kept, in that order
                want.narrow(dim, 0, 2).copy_(was.index_select(dim, torch.tensor([0, 2])))
                want.narrow(dim, 2, 2).zero_()
            else:  # slot 3 grown
                want.narrow(dim, 3, 1).zero_()
            assert torch.equal(got, want), (name, which)
    assert len(callback.decisions) == 2


def test_every_decision_step_hands_its_batches_to_the_allocator_and_no_other_step_does():
    """The forward pre-hook that gives each micro-batch's keyword arguments (its attention_mask)
    to the allocator is armed at every decision step (steps 0, 2, 4 here) and removed before the
    optimizer step (a handle left set would leave the next decision without the batches)."""
    import types

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 6))

        def forward(self, x, attention_mask):
            return self.body(x) * attention_mask[..., None]

    torch.manual_seed(0)
    net = Net()
    lorambo.configure_model(net, 1, capacity=3)
    allocator = LoRAMBoOptimizer(net, 10**4, interval=2, sketch_rank=2, seed=5)
    optimizer = allocator.make_optimizer(lr=0.01)
    callback = LoRAMBoCallback(allocator)
    args = types.SimpleNamespace(should_save=False, output_dir="unused")
    seen, armed = [], []
    real_begin = allocator.begin_step
    allocator.begin_step = lambda step, batch=None: seen.append((step, batch is not None)) or real_begin(step, batch)
    for step in range(5):
        state = types.SimpleNamespace(global_step=step)
        callback.on_step_begin(args, state, None)
        armed.append(len(net._forward_pre_hooks))
        batch = {"x": torch.randn(2, 3, 5), "attention_mask": torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])}
        ((net(**batch) - torch.randn(2, 3, 6)) ** 2).mean().backward()
        callback.on_pre_optimizer_step(args, state, None, optimizer=optimizer)
        assert not net._forward_pre_hooks, step
        optimizer.step()
        optimizer.zero_grad()
    assert armed == [1, 0, 1, 0, 1]
    assert [s for s, with_batch in seen if with_batch] == [0, 2, 4]
