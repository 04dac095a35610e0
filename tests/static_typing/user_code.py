"""A user's training script, as a type checker sees it: every call here is correct, so
``mypy --strict`` must report nothing in it (tests/static_typing/test_user_code_types.py). It is
only type-checked, never run."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler

import lorambo
import lorambo.integrations.fsdp
import lorambo.nn
import lorambo.sensitivity
from lorambo import LoRAMBoLinear, LoRAMBoOptimizer, configure_model, lora_layers
from lorambo.integrations import LoRAMBoCallback

Batch = Mapping[str, torch.Tensor]


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    out: torch.Tensor = model(batch["x"])
    return out.pow(2).mean()


def the_layer(base: nn.Linear) -> LoRAMBoLinear:
    layer = LoRAMBoLinear(base, rank=4, capacity=8, alpha=8.0, dropout=0.1, use_rslora=False, name="proj")
    rank: int = layer.rank
    sizes: tuple[int, int, int] = (layer.capacity, layer.in_features, layer.out_features)
    settings: tuple[float, float, float, bool] = (layer.scaling, layer.alpha, layer.dropout, layer.use_rslora)
    pools: tuple[nn.Parameter, nn.Parameter] = (layer.lora_A, layer.lora_B)
    merged: bool = layer.merged
    weight: torch.Tensor = layer.weight
    y: torch.Tensor = layer(torch.randn(2, base.in_features))
    print(rank, sizes, settings, pools, merged, weight, layer.bias, layer.slot_edits, y, layer.delta_weight())
    return layer


def change_ranks(layer: LoRAMBoLinear, opt: torch.optim.Optimizer, pools: list[torch.optim.SGD]) -> None:
    old: int = layer.set_rank(8, optimizer=opt, generator=torch.Generator().manual_seed(0))
    layer.set_rank(2, optimizer=pools)  # one optimizer per pool (or per parameter), as a list or tuple
    layer.set_rank(old, optimizer=(opt, pools[0]))
    kept: int = layer.keep_components([1, 0], optimizer=opt)
    layer.keep_components([0], optimizer=pools)
    moved: list[int] = lorambo.nn.keep_components_many([(layer, [0])], optimizer=pools)
    lorambo.configure_model(layer, {"": 4}, optimizer=pools)
    lorambo.configure_model(layer, 4, target_modules=("query", "value"), modules_to_save=("classifier",))
    lorambo.reset_slot_state(opt, layer, range(kept))
    lorambo.reset_slot_state(pools, layer, [0], all_active_new=True)
    lorambo.nn.gather_slot_state((opt, pools[0]), layer, [0], old_rank=kept)
    layer.merge()
    layer.unmerge()
    print(old, moved)


def train(model: nn.Module, batches: list[Batch]) -> None:
    adapted: nn.Module = configure_model(model, ranks=8, target_modules=["query", "value"], capacity=32, alpha=16.0)
    layers: dict[str, LoRAMBoLinear] = lora_layers(adapted)
    opt = lorambo.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    for step, batch in enumerate(batches):
        loss_fn(model, batch).backward()
        if step == 4:
            for layer in layers.values():
                layer.set_rank(16, optimizer=opt)
        opt.step()
        opt.zero_grad()
    loss: float | None = opt.step(lambda: loss_fn(model, batches[0]).item())
    dims = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    ranks: dict[str, int] = lorambo.allocate(dims, {n: 1.0 for n in layers}, budget=100_000, method="closed_form",
                                             capacities={n: layer.capacity for n, layer in layers.items()})
    configure_model(model, ranks, optimizer=opt)
    saved: Path = lorambo.save_adapter(model, "run/adapter.safetensors")
    lorambo.load_adapter(model, saved)
    lorambo.export_peft(model, Path("run/peft"))
    lorambo.import_peft(model, "run/peft", capacity=32)
    counts: dict[str, int | float] = lorambo.trainable_parameters(model)
    plain: nn.Module = lorambo.unload(model, merge=True)
    version: str = lorambo.__version__
    print(counts, plain, loss, version)


def allocator(model: nn.Module, batches: list[Batch], scaler: GradScaler) -> None:
    opt = LoRAMBoOptimizer(model, total_budget=6_000, initial_budget=4_000, sensitivity_method="gradient",
                           warmup_steps=20, interval=20, stop_step=200, loss_improvement_threshold=0.0,
                           log_path="run/decisions.jsonl", modules_to_save=["classifier"], target_modules=["query"])
    ranks: dict[str, int] = opt.compute_optimal_ranks(batches, loss_fn)
    opt.configure(ranks)
    torch_opt: lorambo.optim.AdamW = opt.make_optimizer(lr=1e-3, weight_decay=0.0)
    importance = lorambo.sensitivity.AdaLoRAImportance(model)
    for step, batch in enumerate(batches):
        with opt.capture(step, batch) as capturing:
            loss_fn(model, batch).backward()
        print(capturing.is_decision_step(step))
        decisions: list[dict[str, object]] = opt.step(step, optimizer=[torch_opt])
        opt.update_ranks(torch_opt, step=step, component_scores=importance.component_scores(), grad_scaler=scaler)
        lorambo.integrations.fsdp.allocator_step(opt, step, torch_opt, grad_scaler=scaler)
        torch_opt.step()
        torch_opt.zero_grad()
        print(decisions)
    schedule: tuple[int, int | None, int | None] = (opt.warmup_steps, opt.interval, opt.stop_step)
    moves = LoRAMBoOptimizer(model, 6_000.0, allocation="alora", alora={"k1": 10, "rounds": 2}, heldout_batches=batches,
                             loss_fn=loss_fn, token_mask=lambda batch: batch["attention_mask"], capacity={"query": 16})
    scores: dict[str, float] = moves.compute_sensitivities(iter(batches), lambda m, b: m(**b))
    moves.compute_optimal_ranks()  # alora starts uniform: it reads neither sensitivities nor gain curves
    LoRAMBoOptimizer(model, 6_000).compute_optimal_ranks(sensitivities=scores)
    LoRAMBoOptimizer(model, 6_000, allocation="knapsack").compute_optimal_ranks(benefits={"query": [1.0, 0.5]})
    print(opt.rank_table(), opt.decisions, opt.current_ranks(), schedule)
    heatmap: Path = opt.save_heatmap("run/ranks.png")
    adapted: nn.Module = opt.configure()
    with lorambo.disable_adapter(adapted) as base:
        print(base(batches[0]["x"]), heatmap)
    print(lorambo.peft_config(ranks, alpha=16.0, task_type="FEATURE_EXTRACTION"), lorambo.peft_config(adapted))
    opt.load_state_dict(opt.state_dict())
    records: list[dict[str, object]] = lorambo.read_decisions(Path("run/decisions.jsonl"))
    callback = LoRAMBoCallback(opt, importance=importance, grad_scaler=scaler)
    saved = lorambo.integrations.fsdp.save_adapter(model, Path("run/sharded"))
    print(records, callback, saved)


def estimators(model: nn.Module, batches: list[Batch], scaler: GradScaler) -> None:
    traces = lorambo.sensitivity.hessian_trace(model, loss_fn, batches, num_probes=8, method="hutch++")
    value: float = traces["layer"].value
    norms = lorambo.sensitivity.hessian_opnorm(model, loss_fn, iter(batches), modules=["query"])
    grads: dict[str, float] = lorambo.sensitivity.gradient_sensitivity(model, lambda m, b: m(**b), batches, "query")
    covariances: dict[str, torch.Tensor] = lorambo.sensitivity.data_covariance(model, loss_fn, batches, token_mask=None)
    with lorambo.sensitivity.FisherProxy(model, reduction="token_mean", grad_scaler=scaler) as fisher:
        for batch in batches:
            loss_fn(model, batch).backward()
    estimate: lorambo.sensitivity.Estimate = fisher.estimates()["layer"]
    ablations = lorambo.sensitivity.ablation_scores(model, loss_fn, batches)
    missed: list[str] = lorambo.sensitivity.targets_without_gradient(model, loss_fn, batches[0])
    importance = lorambo.sensitivity.AdaLoRAImportance(model, ["query"])
    trace = lorambo.sensitivity.hutchinson(lambda x: 2 * x, dim=16, num_matvecs=8, device="cpu")
    print(value, norms, grads, covariances, estimate, ablations, missed, importance, trace.stderr)
