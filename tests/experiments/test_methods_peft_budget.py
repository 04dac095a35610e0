"""peft's EVA and AdaLoRA held to a budget counted in parameters (lorambo/experiments/methods_peft.py),
on a tiny random BERT: EVA's settings, which of its components are kept when peft's redistribution
costs more than P, the bounds on peft's SVD loop, AdaLoRA's final ranks and penalty, and the
parameter counts both report, each checked against the layer shapes."""

import pytest
import torch
from transformers import BertConfig, BertModel

from lorambo.experiments.methods import RunContext, budget_of, spent
from lorambo.experiments.registry import make_method
from lorambo.experiments.student import dims_of, fresh_student, short, target_names
from lorambo.optim import AdamW

pytest.importorskip("peft")


class TinyTask:
    """The parts of a task the peft methods read: names, dims, fresh students and EVA's rows."""

    def __init__(self, seed=0, rows=64, tokens=6):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        self.bert = BertModel(config, add_pooling_layer=False).eval()
        self.names, self.dims = target_names(self.bert), dims_of(self.bert)
        gen = torch.Generator().manual_seed(seed + 1)
        mask = torch.ones(rows, tokens, dtype=torch.long)
        mask[::3, tokens // 2:] = 0                              # padded rows
        self.rows = {"input_ids": torch.randint(1, 40, (rows, tokens), generator=gen), "attention_mask": mask}

    def eva_batches(self, batches, batch_size=32):
        return [{k: v[i:i + batch_size] for k, v in self.rows.items()}
                for i in range(0, min(batches * batch_size, len(self.rows["input_ids"])), batch_size)]

    def fresh_student(self, seed):
        return fresh_student(self.bert, None, seed)


def _eva(task, cfg, level, budget):
    ctx = RunContext(task, cfg, level, budget, 0, [], [])
    run = make_method("eva", ctx)
    assert run.setup(task.fresh_student(0)) is run.model        # the model train_run trains
    return run, ctx


def _cfg(tiny_cfg, **kw):
    return tiny_cfg.replace(growth_factor=2.0, eva_batches=2, **kw)


def _input_variance_shares(task, components):
    """{short name: [share of the layer's centred input variance along each component]}, in float64
    from the inputs each layer of the plain encoder sees on EVA's rows, at the tokens peft's own SVD
    takes (the attention mask's: padding left out)."""
    student, inputs, rows = task.fresh_student(0), {}, []
    hooks = [student.get_submodule(n).register_forward_hook(
        lambda m, args, out, n=n: inputs.setdefault(short(n), []).append(args[0][rows[-1]]))
        for n in task.names]
    with torch.no_grad():
        for batch in task.eva_batches(2):
            rows.append(batch["attention_mask"] == 1)
            student(batch)
    for h in hooks:
        h.remove()
    shares = {}
    for name, u in components.items():
        x = torch.cat(inputs[name]).double()
        x = x - x.mean(0)
        cov = x.T @ x / x.shape[0]
        shares[name] = [float(c @ cov @ c / torch.trace(cov)) for c in u.double()]
    return shares


def test_eva_settings_follow_the_level_and_growth_factor_quietly(tiny_cfg, capfd):
    """r = the level rounded up (at least 1), lora_alpha = r (scaling 1), no dropout, rho = growth
    factor, no label mask; peft's progress bars and its low_cpu_mem_usage tip stay off."""
    import warnings

    task = TinyTask(seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run, _ = _eva(task, tiny_cfg.replace(growth_factor=3.0, eva_batches=2), 2.0, budget=10**9)
    assert not [w for w in caught if "low_cpu_mem_usage" in str(w.message)]
    config = run.model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 2, 0.0)
    assert (config.eva_config.rho, config.eva_config.use_label_mask) == (3.0, False)
    assert "it/s" not in capfd.readouterr().err


@pytest.mark.parametrize("level, r", [(1.5, 2), (2.5, 3), (2.01, 3)])
def test_eva_rank_rounds_a_fractional_level_up(tiny_cfg, level, r):
    """r * layers ranks must cover the level's mean rank, as AdaLoRA's target_r does: rounding
    half to even gave 2.5 -> 2, an EVA that could not spend its budget."""
    run, _ = _eva(TinyTask(seed=1), _cfg(tiny_cfg), level, budget=10**9)
    assert run.model.peft_config["default"].r == r


def test_eva_over_budget_keeps_the_highest_variance_components_that_fit(tiny_cfg):
    task = TinyTask()
    cfg = _cfg(tiny_cfg)
    unlimited, _ = _eva(task, cfg, 2.0, budget=10**9)
    raw = unlimited.final_ranks()
    assert sum(raw.values()) == 2 * len(task.names)             # r x layers, redistributed by peft
    budget = spent(raw, task.dims) * 3 // 5
    run, ctx = _eva(task, cfg, 2.0, budget)
    ranks = run.final_ranks()

    # what was kept, read from the model: lora_A rows are the EVA components, a prefix of each layer's
    full = {short(k): u for k, u in unlimited.ctx.cache[("eva", 2.0)].items()}
    for key, u in ctx.cache[("eva", 2.0)].items():
        assert torch.equal(u, full[short(key)][:ranks[short(key)]]), key
    for n in task.names:
        if ranks[short(n)]:
            assert run.model.get_submodule(n).lora_A["default"].weight.shape[0] == ranks[short(n)], n

    # the variance shares, computed here from the layer inputs in float64
    shares = _input_variance_shares(task, full)
    theirs = run._variance_shares({k: u for k, u in unlimited.ctx.cache[("eva", 2.0)].items()})
    for key, sh in theirs.items():
        torch.testing.assert_close(torch.tensor(sh), torch.tensor(shares[short(key)]), rtol=1e-7, atol=0)
    assert all(not m._forward_hooks for m in run.model.modules())   # its hooks came off again

    # then the greedy over them: of each layer's next component that still fits, the best share
    want, used = dict.fromkeys(full, 0), 0
    while True:
        fits = [(shares[n][want[n]], n) for n in full
                if want[n] < len(shares[n]) and used + sum(task.dims[n]) <= budget]
        if not fits:
            break
        _, name = max(fits)
        want[name], used = want[name] + 1, used + sum(task.dims[name])
    assert {n: r for n, r in ranks.items() if n in want} == want
    assert spent(ranks, task.dims) == used <= budget < used + max(sum(d) for d in task.dims.values())
    assert run.trainable_lora_params() == sum(r * sum(task.dims[n]) for n, r in ranks.items())


def test_eva_within_budget_loads_peft_redistribution_whole(tiny_cfg, monkeypatch):
    task = TinyTask(seed=3)
    unlimited, _ = _eva(task, _cfg(tiny_cfg), 2.0, budget=10**9)
    raw = unlimited.final_ranks()
    assert set(raw) == {short(n) for n in task.names}

    def no_fit(self, state):
        raise AssertionError("a redistribution within P was refitted")

    monkeypatch.setattr(type(unlimited), "_variance_shares", no_fit)
    run, _ = _eva(task, _cfg(tiny_cfg), 2.0, budget=spent(raw, task.dims))   # exactly P: nothing dropped
    assert run.final_ranks() == raw
    assert run.trainable_lora_params() == spent(raw, task.dims)


def test_eva_at_level_half_gets_one_rank_per_layer_and_reports_dropped_layers_as_zero(tiny_cfg):
    """Level 0.5 (the full preset's smallest) rounds to r = 1; a layer whose only component
    does not fit reports rank 0 and holds no LoRA parameters."""
    task = TinyTask(seed=4)
    unlimited, _ = _eva(task, _cfg(tiny_cfg), 0.5, budget=10**9)
    assert unlimited.model.peft_config["default"].r == 1
    assert sum(unlimited.final_ranks().values()) == len(task.names)
    half = spent(unlimited.final_ranks(), task.dims) // 2
    run, _ = _eva(task, _cfg(tiny_cfg), 0.5, budget=half)
    ranks = run.final_ranks()
    assert set(ranks) == set(task.dims) and 0 in ranks.values() and 1 in ranks.values()
    assert run.trainable_lora_params() == spent(ranks, task.dims) <= half


def test_eva_reuses_its_svd_for_the_same_level(tiny_cfg, monkeypatch):
    """A second run at the same level (another seed or rate) reads the cached components instead
    of running peft's SVD again."""
    import peft.tuners.lora.eva as eva

    task = TinyTask(seed=2)
    first, ctx = _eva(task, _cfg(tiny_cfg), 2.0, budget=budget_of(1.0, task.dims))

    def no_svd(*args, **kwargs):
        raise AssertionError("peft's SVD ran again for a level already computed")

    monkeypatch.setattr(eva, "get_eva_state_dict", no_svd)
    second = make_method("eva", ctx)
    second.setup(task.fresh_student(1))
    assert second.final_ranks() == first.final_ranks()


def test_eva_stops_a_peft_svd_that_never_converges_after_eva_max_passes(tiny_cfg, monkeypatch):
    """peft's EVA loop cycles over the batches until every layer converges: the method bounds it."""
    import peft.tuners.lora.eva as eva

    task, calls = TinyTask(seed=4), []

    def never_converges(model, data, forward_fn, **kwargs):
        for batch in data * 10:
            calls.append(len(batch["input_ids"]))
            forward_fn(model, batch)
        raise AssertionError("the bound was not applied")

    monkeypatch.setattr(eva, "get_eva_state_dict", never_converges)
    with pytest.raises(RuntimeError, match=r"did not converge in 3 passes over 2 batches; raise eva_batches"):
        _eva(task, _cfg(tiny_cfg, eva_max_passes=3), 2.0, budget=10**9)
    assert calls == [32, 32, 32, 32]                       # the fourth forward is refused


def test_eva_fit_spends_up_to_exactly_p(tiny_cfg):
    """The fit on given variance shares: components that cost exactly P are all kept, and a
    redistribution that costs exactly P is kept whole even where a later component outranks an
    earlier one of its layer."""
    task = TinyTask()
    query, ffn = "layer.0.attention.self.query", "layer.0.intermediate.dense"
    cost = {n: sum(task.dims[n]) for n in (query, ffn)}
    assert cost[query] != cost[ffn]
    ctx = RunContext(task, tiny_cfg, 2.0, 0, 0, [], [])
    run = make_method("eva", ctx)
    gen = torch.Generator().manual_seed(8)
    state = {f"base_model.model.bert.encoder.{query}": torch.randn(2, 16, generator=gen),
             f"base_model.model.bert.encoder.{ffn}": torch.randn(1, 16, generator=gen)}
    raw = {query: 2, ffn: 1}

    def kept(shares, budget):
        run._variance_shares = lambda s: {k: shares[short(k)] for k in s}
        ctx.budget = budget
        out = {short(k): u for k, u in run._fit_budget(state, raw).items()}
        for name, u in out.items():
            assert torch.equal(u, state[f"base_model.model.bert.encoder.{name}"][:len(u)])
        return {n: len(u) for n, u in out.items()}

    best_two = {query: [0.5, 0.4], ffn: [0.1]}
    assert kept(best_two, 2 * cost[query]) == {query: 2, ffn: 0}
    assert kept(best_two, 2 * cost[query] - 1) == {query: 1, ffn: 0}
    assert kept({query: [0.1, 0.3], ffn: [0.2]}, spent(raw, task.dims)) == raw
    # a component that does not fit ends its layer, not the fit: the cheaper query still fits
    # (before: the fit stopped at the first one that did not, and spent nothing here)
    assert cost[ffn] > cost[query]
    assert kept({query: [0.1, 0.05], ffn: [0.6]}, cost[query]) == {query: 1, ffn: 0}


def test_eva_fit_takes_a_layers_later_component_once_the_earlier_one_is_kept(tiny_cfg):
    """A later component that outranks an earlier one of its layer competes, at its own share,
    once the earlier one is kept. Before, it was passed over for good (its turn came first), so
    the budget went to a component of far smaller share."""
    task = TinyTask()
    query, ffn, key = "layer.0.attention.self.query", "layer.0.intermediate.dense", "layer.1.attention.self.key"
    cost = {n: sum(task.dims[n]) for n in (query, ffn, key)}
    assert cost[query] == cost[key] < cost[ffn]
    ctx = RunContext(task, tiny_cfg, 2.0, cost[ffn] + 2 * cost[query], 0, [], [])
    run = make_method("eva", ctx)
    gen = torch.Generator().manual_seed(9)
    prefix = "base_model.model.bert.encoder."
    state = {prefix + query: torch.randn(2, 16, generator=gen), prefix + ffn: torch.randn(1, 16, generator=gen),
             prefix + key: torch.randn(1, 16, generator=gen)}
    shares = {query: [0.1, 0.3], ffn: [0.2], key: [0.05]}
    run._variance_shares = lambda s: {k: shares[short(k)] for k in s}
    out = run._fit_budget(state, {query: 2, ffn: 1, key: 1})
    assert {short(k): len(u) for k, u in out.items()} == {query: 2, ffn: 1, key: 0}


def _trained_adalora(task, cfg, level):
    """AdaLoRA through its whole schedule, its hooks called as train_run calls them."""
    ctx = RunContext(task, cfg, level, budget_of(level, task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    model = run.setup(task.fresh_student(0))
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    batch = task.eva_batches(1)[0]
    for step in range(cfg.steps):
        (model(batch).square().mean() + run.extra_loss(model)).backward()
        optimizer.step()
        run.after_step(step)
        optimizer.zero_grad(set_to_none=True)
    return run, ctx


def test_adalora_final_ranks_and_parameters_are_read_from_its_unmasked_triplets(tiny_cfg):
    task = TinyTask(seed=5)
    run, ctx = _trained_adalora(task, tiny_cfg.replace(steps=10, growth_factor=2.0), 2.0)
    ranks = run.final_ranks()
    assert set(ranks) == set(task.dims)
    from_model, params = {}, 0
    for n in task.names:
        layer = run.model.get_submodule(n)
        d, k = layer.lora_B["default"].shape[0], layer.lora_A["default"].shape[1]   # from the layer's shapes
        from_model[short(n)] = int((layer.lora_E["default"] != 0).sum())
        params += from_model[short(n)] * (d + k)
    assert ranks == from_model
    assert run.trainable_lora_params() == params == spent(ranks, task.dims)
    assert ctx.budget - max(ctx.costs.values()) < params <= ctx.budget
    assert len(set(ranks.values())) > 1                     # peft's scores chose: not one rank everywhere


def test_adalora_orthogonality_penalty_is_peft_formula(tiny_cfg):
    """weight x mean over every trainable lora_A (A Aᵀ) and lora_B (Bᵀ B) of the Frobenius distance
    from the identity, computed here in float64."""
    task = TinyTask(seed=6)
    ctx = RunContext(task, tiny_cfg, 2.0, budget_of(2.0, task.dims), 0, [], [])
    run = make_method("adalora", ctx)
    model = run.setup(task.fresh_student(0))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen))
    terms = []
    for n in task.names:
        layer = model.get_submodule(n)
        a, b = layer.lora_A["default"].double(), layer.lora_B["default"].double()
        terms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], dtype=a.dtype)))
        terms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], dtype=b.dtype)))
    want = run.config.orth_reg_weight * torch.stack(terms).mean()
    got = run.extra_loss(model)
    assert run.config.orth_reg_weight > 0 and got.requires_grad
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
