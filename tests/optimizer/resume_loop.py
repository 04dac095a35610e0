"""A plain training loop under LoRAMBoOptimizer, checkpointed and resumed as docs/allocation.md's
"Checkpoints and resume" shows, for the resume property tests.

``cfg`` (a JSON-able dict) picks the allocation (online growth, online growth with rank moves,
ALoRA, or the closed-form square-root law alone), the torch optimizer, gradient accumulation,
bf16 autocast or a float16 model, LoRA dropout, an AdaLoRAImportance scoring the moves, and how the model is
rebuilt (``lorambo.load_adapter`` or a ``torch.save``d model state_dict). A checkpoint holds the
adapter, the model's state_dict, ``opt.state_dict()``, the torch optimizer's and the importance's
state and torch's RNG state, all read back with ``weights_only=True``.

Run as a script (``python resume_loop.py cfg.json ckpt out.pt start``), it resumes from ``ckpt``
in a fresh process, trains from ``start`` to the end and saves :func:`final_state` to ``out.pt``.
"""

import contextlib
import json
import sys
from pathlib import Path

import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer
from lorambo.sensitivity.adalora_importance import AdaLoRAImportance

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # residual_net, when run as a script
from residual_net import ResidualNet  # noqa: E402

STEPS = 7


def mse(model, batch):
    x, y = batch
    return ((model(x.to(model.blocks[0]["up"].weight.dtype)).float() - y) ** 2).mean()


def data(cfg):
    """``STEPS`` steps of ``cfg["accum"]`` micro-batches, then the held-out batches."""
    g = torch.Generator().manual_seed(3)
    steps = [[(torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)) for _ in range(cfg["accum"])]
             for _ in range(STEPS)]
    return steps, [(torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g))]


def base(cfg):
    torch.manual_seed(0)
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    return ResidualNet(dtype=dtype, head=("classifier", 8) if cfg["head"] else None)


def allocator(model, cfg, heldout, log):
    kw = dict(sensitivity_method=cfg["sensitivity"], num_probes=2, seed=cfg["seed"], log_path=log,
              heldout_batches=heldout, loss_fn=mse, sketch_rank=1, power_iters=2, max_rank=cfg["max_rank"],
              target_modules=["up", "down"], modules_to_save=["classifier"] if cfg["head"] else None)
    if cfg["mode"] == "alora":
        kw.update(allocation="alora", alora=dict(k1=cfg["warmup"], k2=cfg["interval"], rounds=2, n_prune=1))
    else:
        kw.update(initial_budget=cfg["initial_budget"])
        if cfg["mode"] != "closed_form":
            kw.update(warmup_steps=cfg["warmup"], interval=cfg["interval"], stop_step=cfg["stop_step"])
        if cfg["mode"] == "moves":
            kw.update(move_threshold=1e3)
    return LoRAMBoOptimizer(model, cfg["budget"], **kw)


def torch_optimizer(opt, model, cfg):
    if cfg["optimizer"] == "lorambo":
        return opt.make_optimizer(lr=1e-2, weight_decay=0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(params, lr=1e-2)
    return torch.optim.SGD(params, lr=5e-2, momentum=0.9)


def train(run, cfg, steps, batches):
    model, opt, torch_opt, importance = run
    passed = None if cfg["optimizer"] == "lorambo" else torch_opt  # make_optimizer's is the default
    for step in steps:
        for batch in batches[step]:
            with opt.capture(step):
                with torch.autocast("cpu", dtype=torch.bfloat16) if cfg["bf16"] else contextlib.nullcontext():
                    loss = mse(model, batch) / len(batches[step])
                loss.backward()
        scores = None
        if importance is not None:
            importance.update()
            if opt.is_decision_step(step):
                scores = importance.component_scores()
        for rec in opt.step(step, optimizer=passed, component_scores=scores):
            if importance is None:
                continue
            if rec["event"] == "shrink":  # as LoRAMBoCallback follows its decisions
                importance.keep(rec["layer"], [k for k in range(rec["old_rank"]) if k not in rec["components"]])
            else:
                importance.reset(rec["layer"], range(rec["old_rank"], rec["new_rank"]))
        torch_opt.step()
        torch_opt.zero_grad()


def start(cfg, log):
    """A new run: measure, allocate, configure."""
    batches, heldout = data(cfg)
    model = base(cfg)
    opt = allocator(model, cfg, heldout, log)
    opt.compute_optimal_ranks(batches[0], mse)
    opt.configure(dropout=cfg["dropout"])
    importance = AdaLoRAImportance(model) if cfg["importance"] else None
    torch.manual_seed(1)  # the dropout masks
    return model, opt, torch_optimizer(opt, model, cfg), importance


def save(run, folder):
    model, opt, torch_opt, importance = run
    lorambo.save_adapter(model, folder)
    torch.save({"lorambo": opt.state_dict(), "optimizer": torch_opt.state_dict(), "model": model.state_dict(),
                "importance": None if importance is None else importance.state_dict(),
                "capacities": {n: m.capacity for n, m in lorambo.lora_layers(model).items()},
                "rng": torch.get_rng_state()}, Path(folder) / "state.pt")


def resume(cfg, folder, log):
    """The run saved in ``folder``, rebuilt from the base model as a new process would."""
    state = torch.load(Path(folder) / "state.pt", weights_only=True)
    if cfg["rebuild"] == "adapter":
        model = lorambo.load_adapter(base(cfg), folder)
    else:
        model = lorambo.configure_model(base(cfg), 1, target_modules=list(state["capacities"]),
                                        capacity=state["capacities"], dropout=cfg["dropout"],
                                        modules_to_save=["classifier"] if cfg["head"] else None)
        model.load_state_dict(state["model"])
    opt = allocator(model, cfg, data(cfg)[1], log)
    torch_opt = torch_optimizer(opt, model, cfg)
    if cfg["optimizer"] != "lorambo":  # opt.state_dict() holds make_optimizer's
        torch_opt.load_state_dict(state["optimizer"])
    opt.load_state_dict(state["lorambo"])
    importance = None
    if cfg["importance"]:
        importance = AdaLoRAImportance(model)
        importance.load_state_dict(state["importance"])
    torch.set_rng_state(state["rng"])
    return model, opt, torch_opt, importance


def final_state(run) -> dict:
    """Everything the comparison checks: parameters, ranks, optimizer and importance state, decisions."""
    model, opt, torch_opt, importance = run
    imp = None if importance is None else importance.state_dict()
    return {"params": {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)},
            "ranks": opt.current_ranks(), "decisions": opt.decisions,
            "allocation": (opt.ranks, opt.capacities, opt.sensitivities),
            "optimizer": torch_opt.state_dict()["state"],
            "importance": None if imp is None else {k: imp[k] for k in ("steps", "skipped_steps", "ibar", "ubar")}}


def assert_same(got: dict, want: dict) -> None:
    """Bit for bit (slot ids aside: every process numbers its components itself)."""
    assert got["decisions"] == want["decisions"]
    assert got["ranks"] == want["ranks"]
    assert got["allocation"] == want["allocation"]
    assert got["params"].keys() == want["params"].keys()
    for k, v in want["params"].items():
        assert torch.equal(got["params"][k], v), k
    assert got["optimizer"].keys() == want["optimizer"].keys()
    for i, s in want["optimizer"].items():
        assert s.keys() == got["optimizer"][i].keys(), i
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(got["optimizer"][i][key]), torch.as_tensor(v)), (i, key)
    assert (got["importance"] is None) == (want["importance"] is None)
    if want["importance"] is not None:
        assert got["importance"]["steps"] == want["importance"]["steps"]
        assert got["importance"]["skipped_steps"] == want["importance"]["skipped_steps"]
        for table in ("ibar", "ubar"):
            assert got["importance"][table].keys() == want["importance"][table].keys()
            for k, v in want["importance"][table].items():
                assert torch.equal(got["importance"][table][k], v), (table, k)


if __name__ == "__main__":
    cfg_file, folder, out, first = sys.argv[1:5]
    torch.set_num_threads(1)
    config = json.loads(Path(cfg_file).read_text())
    resumed = resume(config, folder, Path(folder) / "decisions.jsonl")
    train(resumed, config, range(int(first), STEPS), data(config)[0])
    torch.save(final_state(resumed), out)
