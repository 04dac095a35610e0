"""Trainer resume of an architecture that transformers 5 saves under other keys than it loads
(ViT: ``vit.layers.0.attention.q_proj`` is written as ``vit.encoder.layer.0.attention.attention.query``).
Trainer's ``load_state_dict(strict=False)`` then restored none of the adapted layers: a run whose
ranks had grown stopped on the rank check, one whose ranks had not went on silently from the
rebuilt model's untrained pools. LoRAMBoCallback restores them from the checkpoint's
``adapter.safetensors``, with a warning, and the resumed run is the uninterrupted one; likewise
after ``load_best_model_at_end``, which left the last step's pools under the best checkpoint's
decisions."""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lorambo  # noqa: E402
from lorambo.integrations import LoRAMBoCallback  # noqa: E402
from lorambo.optimizer import LoRAMBoOptimizer  # noqa: E402

STEPS, SAVE_AT = 4, 2


def _vit():
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=8, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=24, num_labels=3,
                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.ViTForImageClassification(cfg)


def _run(out, grow, resume=None):
    torch.set_num_threads(1)
    model = lorambo.configure_model(_vit(), 1, target_modules=["q_proj", "v_proj"], capacity=4,
                                    modules_to_save=["classifier"])
    budget = sum((3 if grow else 1) * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    alloc = LoRAMBoOptimizer(model, total_budget=budget, warmup_steps=1, interval=1, sketch_rank=2, seed=3)
    g = torch.Generator().manual_seed(5)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
            for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2, report_to="none",
        use_cpu=True, save_strategy="steps", save_steps=SAVE_AT, disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[LoRAMBoCallback(alloc)],
                                   optimizers=(alloc.make_optimizer(lr=1e-2), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=resume)
    return model, [str(w.message) for w in caught if "LoRAMBoCallback" in str(w.message)]


@pytest.mark.parametrize("grow", [False, True])
def test_resume_restores_pools_that_trainer_did_not_load(tmp_path, grow):
    model, _ = _run(tmp_path / "run", grow)
    if grow:
        assert any(layer.rank > 1 for layer in lorambo.lora_layers(model).values())
    resumed, messages = _run(tmp_path / "run", grow, resume=str(tmp_path / "run" / f"checkpoint-{SAVE_AT}"))
    assert {n: m.rank for n, m in lorambo.lora_layers(resumed).items()} == \
        {n: m.rank for n, m in lorambo.lora_layers(model).items()}
    resumed_state = resumed.state_dict()
    for key, value in model.state_dict().items():
        if "lora_" in key or "classifier" in key or "_extra_state" in key:
            torch.testing.assert_close(resumed_state[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert any("left 2 adapted layer(s) or modules_to_save without their saved state (['vit.layers.0.attention.q_proj'"
               ", 'vit.layers.0.attention.v_proj']" in m for m in messages)  # the classifier's keys loaded


def test_load_best_model_at_end_restores_the_best_pools_trainer_did_not_load(tmp_path):
    torch.set_num_threads(1)
    model = lorambo.configure_model(_vit(), 1, target_modules=["q_proj", "v_proj"], capacity=4)
    budget = sum(3 * (m.in_features + m.out_features) for m in lorambo.lora_layers(model).values())
    alloc = LoRAMBoOptimizer(model, total_budget=budget, warmup_steps=1, interval=1, sketch_rank=2, seed=3)
    g = torch.Generator().manual_seed(5)
    data = [{"pixel_values": torch.randn(3, 16, 16, generator=g), "labels": torch.randint(0, 3, (), generator=g)}
            for _ in range(16)]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=STEPS, learning_rate=1e-2,
        report_to="none", use_cpu=True, save_strategy="steps", save_steps=1, eval_strategy="steps", eval_steps=1,
        load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True,  # the worst: not the last
        disable_tqdm=True, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4],
                                   callbacks=[LoRAMBoCallback(alloc)], optimizers=(alloc.make_optimizer(lr=1e-2), None))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and not best.endswith(f"checkpoint-{STEPS}")
    expected = lorambo.configure_model(_vit(), 1, target_modules=["q_proj", "v_proj"], capacity=4)
    lorambo.load_adapter(expected, best)
    layers = lorambo.lora_layers(model)
    for name, layer in lorambo.lora_layers(expected).items():
        assert layers[name].rank == layer.rank, name
        torch.testing.assert_close(layers[name].lora_A, layer.lora_A, rtol=0, atol=0, msg=name)
        torch.testing.assert_close(layers[name].lora_B, layer.lora_B, rtol=0, atol=0, msg=name)
    assert any("restored from" in str(w.message) and best in str(w.message) for w in caught)
