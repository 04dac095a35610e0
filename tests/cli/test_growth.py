"""The pieces of ``lorambo demo --growth`` (lorambo/cli/growth.py) on a small stand-in model, with
the MiniLM embedding replaced: the ranks each module type gets, the contrastive loss, which layers
grow and what the growth check reports."""

import random
import warnings

import pytest
import torch
from torch import nn

from lorambo.cli import growth
from lorambo.model import configure_model, lora_layers
from lorambo.optim import AdamW


def test_each_module_type_gets_its_rank_and_attention_output_is_not_output():
    for kind in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):
        name = f"encoder.layer.3.{kind}"
        expected = growth.DEMO_RANKS[kind.removeprefix("attention.self.")]
        assert growth._rank_for(name) == expected, name
    assert growth.DEMO_RANKS["attention.output.dense"] != growth.DEMO_RANKS["output.dense"]  # the test can tell
    with pytest.raises(KeyError, match="pooler.dense"):
        growth._rank_for("pooler.dense")


def _fake_embeddings(monkeypatch, dim=8, seed=0):
    """Each text a fixed random unit vector (drawn on first sight, seeded)."""
    gen, table = torch.Generator().manual_seed(seed), {}

    def embed(model, tokenizer, texts):
        for t in texts:
            if t not in table:
                table[t] = nn.functional.normalize(torch.randn(dim, generator=gen, dtype=torch.float64), dim=0)
        return torch.stack([table[t] for t in texts])

    monkeypatch.setattr(growth, "embed", embed)
    return table


def test_contrastive_loss_is_symmetric_infonce_over_the_halves(monkeypatch):
    table = _fake_embeddings(monkeypatch)
    rng = random.Random(1)
    paragraphs = [" ".join(rng.choice(["alpha", "beta", "gamma", "delta", "eps"]) + str(rng.randint(0, 99))
                           for _ in range(rng.randint(4, 9))) for _ in range(5)]
    loss = growth.contrastive_loss(None, None, paragraphs)
    halves = [(" ".join(p.split()[:len(p.split()) // 2]), " ".join(p.split()[len(p.split()) // 2:]))
              for p in paragraphs]
    a = torch.stack([table[x] for x, _ in halves])
    b = torch.stack([table[y] for _, y in halves])
    sim = a @ b.T / growth.TEMPERATURE
    first_to_second = -torch.log_softmax(sim, dim=1).diagonal().mean()
    second_to_first = -torch.log_softmax(sim, dim=0).diagonal().mean()
    assert first_to_second != pytest.approx(second_to_first)               # the two directions differ
    assert float(loss) == pytest.approx(float(first_to_second + second_to_first) / 2, rel=1e-12)
    assert growth.TEMPERATURE == 0.05                                       # sentence-transformers' scale 20


class Blocks(nn.Module):
    """Six blocks named like MiniLM's encoder (``encoder.layer.<i>.dense``)."""

    def __init__(self, width=10):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(nn.Sequential() for _ in range(6))
        for block in self.encoder.layer:
            block.dense = nn.Linear(width, width)

    def forward(self, x):
        for block in self.encoder.layer:
            x = torch.tanh(block.dense(x))
        return x


def _adapted(seed=0):
    torch.manual_seed(seed)
    model = Blocks()
    names = [f"encoder.layer.{i}.dense" for i in range(6)]
    caps = dict.fromkeys(names, 8)
    caps["encoder.layer.5.dense"] = 3                                      # doubling 2 is capped at 3
    configure_model(model, dict.fromkeys(names, 2), capacity=caps)
    for layer in lora_layers(model).values():                              # trained factors, not zero B
        with torch.no_grad():
            layer.lora_B[:, :layer.rank].normal_()
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(4, 10)).square().sum().backward()
    optimizer.step()
    return model, optimizer


def test_only_blocks_4_and_5_grow_to_twice_their_rank_within_capacity():
    model, optimizer = _adapted()
    grown = growth._grow_last_blocks(model, optimizer)
    assert grown == [("encoder.layer.4.dense", 2, 4), ("encoder.layer.5.dense", 2, 3)]
    assert {n: m.rank for n, m in lora_layers(model).items()} == {
        **{f"encoder.layer.{i}.dense": 2 for i in range(4)}, "encoder.layer.4.dense": 4, "encoder.layer.5.dense": 3}
    with warnings.catch_warnings():  # the optimizer was told of the new slots: no stale-state warning
        warnings.simplefilter("error")
        model(torch.randn(4, 10)).square().sum().backward()
        optimizer.step()


def test_growth_check_reports_an_unchanged_function_and_storage(monkeypatch):
    model, optimizer = _adapted(seed=3)
    x = torch.randn(5, 10, generator=torch.Generator().manual_seed(4))
    calls = []

    def embed(m, tokenizer, texts):
        calls.append((m.training, torch.is_grad_enabled(), tuple(texts)))
        return nn.functional.normalize(m(x[:len(texts)]), dim=-1)

    monkeypatch.setattr(growth, "embed", embed)
    storage = sum(p.untyped_storage().nbytes() for p in model.parameters()) / 2**20
    ranks_before = sum(m.rank for m in lora_layers(model).values())
    model.train()
    report = growth._check_growth(model, None, ["a", "b", "c"], optimizer)
    assert calls == [(False, False, ("a", "b", "c"))] * 2                  # eval mode, no graph, the probe
    assert model.training                                                   # training mode restored
    assert report["grown"] == [("encoder.layer.4.dense", 2, 4), ("encoder.layer.5.dense", 2, 3)]
    assert (report["ranks_before"], report["ranks_after"]) == (ranks_before, ranks_before + 3)
    assert report["max_abs_diff"] <= growth.FP32_ROUNDING
    assert report["same_objects"] is True and report["same_storage"] is True and report["inactive_zero"] is True
    assert report["mib_before"] == report["mib_after"] == pytest.approx(storage, rel=1e-12) and storage > 0


KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
         "intermediate.dense", "output.dense")


class MiniEncoder(nn.Module):
    """MiniLM's layer names and a pooler, at width 16: what the demo adapts and grows."""

    def __init__(self, width=16):
        super().__init__()
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList()
        for _ in range(6):
            block = nn.Module()
            for kind in KINDS:
                parent = block
                *path, leaf = kind.split(".")
                for part in path:
                    if not hasattr(parent, part):
                        parent.add_module(part, nn.Module())
                    parent = getattr(parent, part)
                parent.add_module(leaf, nn.Linear(width, width))
            self.encoder.layer.append(block)
        self.pooler = nn.Linear(width, width)

    def forward(self, x):
        for block in self.encoder.layer:
            for kind in KINDS:
                x = x + 0.3 * torch.tanh(block.get_submodule(kind)(x))
        return x


@pytest.fixture
def mini_demo(monkeypatch):
    """run_growth_demo on MiniEncoder: a text is the mean of its words' fixed random vectors."""
    gen, words = torch.Generator().manual_seed(0), {}

    def embed(model, tokenizer, texts):
        rows = []
        for t in texts:
            for w in t.split():
                words.setdefault(w, torch.randn(16, generator=gen))
            rows.append(torch.stack([words[w] for w in t.split()]).mean(0))
        return nn.functional.normalize(model(torch.stack(rows)), dim=-1)

    monkeypatch.setattr(growth, "embed", embed)
    monkeypatch.setattr(growth, "load_minilm", lambda: (MiniEncoder(), None))
    monkeypatch.setattr(growth, "tqdm", lambda it, **kw: _Bar(it))


class _Bar(list):
    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def test_growth_demo_trains_grows_blocks_4_and_5_and_gives_its_verdict(mini_demo, capsys):
    result = growth.run_growth_demo(steps=6, grow_at=3, batch_size=8, seed=1, lr=1e-2)
    history, report = result["history"], result["growth"]
    assert [s for s, _ in history] == [0, 3, 6]
    assert history[-1][1] < history[0][1]                                  # the held-out loss fell
    assert [n for n, _, _ in report["grown"]] == [f"encoder.layer.{b}.{k}" for b in (4, 5) for k in KINDS]
    assert all(new == 2 * old == 2 * growth.DEMO_RANKS[k.removeprefix("attention.self.")] > old
               for (n, old, new), k in zip(report["grown"], KINDS * 2))       # every grown layer grew
    assert result["ok"] is True
    assert report["ranks_before"] == 6 * sum(growth.DEMO_RANKS.values())
    out = capsys.readouterr().out
    assert "OK: held-out loss" in out and "FAILED" not in out
    assert f"  step 6  {history[-1][1]:.4f}" in out and "  same Parameter objects  " in out
    again = growth.run_growth_demo(steps=6, grow_at=3, batch_size=8, seed=1, lr=1e-2)
    assert again["history"] == history                                     # the seed fixes the run


@pytest.mark.parametrize("broken", ["max_abs_diff", "same_objects", "same_storage", "inactive_zero", "no_learning"])
def test_growth_demo_fails_when_any_check_fails(mini_demo, monkeypatch, capsys, broken):
    real = growth._check_growth

    def check(*args):
        report = real(*args)
        if broken == "max_abs_diff":
            report[broken] = 1e-5                        # float32 rounding of unit vectors is ~1e-7
        elif broken != "no_learning":
            report[broken] = False
        return report

    monkeypatch.setattr(growth, "_check_growth", check)
    lr = 0.0 if broken == "no_learning" else 1e-2
    result = growth.run_growth_demo(steps=4, grow_at=2, batch_size=8, seed=1, lr=lr)
    assert result["ok"] is False
    assert "FAILED: held-out loss" in capsys.readouterr().out


@pytest.mark.parametrize("steps, grow_at, message", [(4.0, 2, "--steps 4.0 must be a whole number >= 2"),
                                                     (True, 1, "--steps True must be a whole number >= 2"),
                                                     (4, 2.0, "--grow-at 2.0 must be inside")])
def test_growth_schedule_must_be_whole_numbers(steps, grow_at, message):
    with pytest.raises(ValueError, match=message):
        growth.check_growth_args(steps, grow_at, 8, paragraphs=100)


def test_growth_demo_checks_its_schedule_before_loading_the_model(monkeypatch):
    """A caller of run_growth_demo (not only the CLI) with growth outside the run gets the
    option's error, not a KeyError once the run is over."""
    def load():
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(growth, "load_minilm", load)
    with pytest.raises(ValueError, match=r"--grow-at 4 must be inside \(0, --steps 4\)"):
        growth.run_growth_demo(steps=4, grow_at=4, batch_size=8)
    with pytest.raises(ValueError, match="--batch-size 1 must be between 2 and"):
        growth.run_growth_demo(steps=4, grow_at=2, batch_size=1)


def test_growth_demo_holds_out_a_seeded_draw_of_64_paragraphs_it_never_trains_on(mini_demo, monkeypatch):
    real, calls = growth.contrastive_loss, []

    def loss(model, tokenizer, paragraphs):
        calls.append((model.training, tuple(paragraphs)))
        return real(model, tokenizer, paragraphs)

    monkeypatch.setattr(growth, "contrastive_loss", loss)

    def held_out_and_trained(seed):
        calls.clear()
        growth.run_growth_demo(steps=4, grow_at=2, batch_size=8, seed=seed, lr=1e-2)
        held = {texts for training, texts in calls if not training}
        trained = [texts for training, texts in calls if training]
        assert len(held) == 1 and len(trained) == 4                     # one fixed set, measured 3 times
        (held,) = held
        assert len(held) == growth.HELD_OUT == len(set(held))
        assert not set(held) & {p for batch in trained for p in batch}   # never trained on
        return held

    first = held_out_and_trained(seed=1)
    assert held_out_and_trained(seed=1) == first
    assert set(held_out_and_trained(seed=2)) != set(first)              # the seed draws the held-out set


def test_growth_demo_clears_the_gradients_before_each_backward(mini_demo, monkeypatch):
    """Each update follows its own batch's gradient: the gradients are cleared between one step's
    update and the next backward (a sum over past batches would be a different optimizer)."""
    events, real_loss = [], growth.contrastive_loss

    class RecordingAdamW(growth.AdamW):
        def zero_grad(self, set_to_none=True):
            events.append("clear")
            super().zero_grad(set_to_none=set_to_none)

        def step(self, closure=None):
            events.append("step")
            return super().step(closure)

    def loss(model, tokenizer, paragraphs):
        value = real_loss(model, tokenizer, paragraphs)
        if model.training:
            value.register_hook(lambda grad: events.append("backward"))
        return value

    monkeypatch.setattr(growth, "AdamW", RecordingAdamW)
    monkeypatch.setattr(growth, "contrastive_loss", loss)
    growth.run_growth_demo(steps=4, grow_at=2, batch_size=8, seed=1, lr=1e-2)
    per_update, current = [], []
    for event in events:
        if event == "step":
            per_update.append(current)
            current = []
        else:
            current.append(event)
    assert len(per_update) == 4 and all(e.count("backward") == 1 for e in per_update), events
    assert all("clear" in e[:e.index("backward")] for e in per_update), events


@pytest.mark.parametrize("steps, grow_at, batch_size, message", [
    (1, 1, 8, "--steps 1 must be a whole number >= 2"),
    (4, 0, 8, r"--grow-at 0 must be inside \(0, --steps 4\)"),
    (4, 4, 8, r"--grow-at 4 must be inside \(0, --steps 4\)"),
    (4, 2, 37, "--batch-size 37 must be between 2 and 36"),
])
def test_growth_schedule_bounds_are_exclusive_of_the_ends(steps, grow_at, batch_size, message):
    with pytest.raises(ValueError, match=message):
        growth.check_growth_args(steps, grow_at, batch_size, paragraphs=100)


@pytest.mark.parametrize("steps, grow_at, batch_size", [(2, 1, 2), (5, 1, 36), (5, 4, 8)])
def test_growth_schedule_accepts_the_smallest_and_the_edges(steps, grow_at, batch_size):
    growth.check_growth_args(steps, grow_at, batch_size, paragraphs=100)   # 100 - 64 held out = 36


@pytest.mark.parametrize("change", ["replaced", "added", "inactive_a", "inactive_b"])
def test_growth_check_reports_what_an_in_place_growth_must_not_do(monkeypatch, change):
    """A growth that swapped a Parameter object (same values) or added one is not in place, and
    one that left a value in an inactive slot of A or B has not kept the unused slots at zero."""
    model, optimizer = _adapted(seed=5)
    monkeypatch.setattr(growth, "embed", lambda m, tokenizer, texts: torch.ones(len(texts), 3))

    def grow(model, optimizer):
        layer = lora_layers(model)["encoder.layer.4.dense"]
        with torch.no_grad():
            if change == "replaced":
                layer.lora_A = nn.Parameter(layer.lora_A.detach().clone())
            elif change == "added":
                layer.register_parameter("extra", nn.Parameter(torch.zeros(1)))
            elif change == "inactive_a":
                layer.lora_A[layer.rank + 1, 3] = 0.5
            else:
                layer.lora_B[2, layer.rank + 1] = 0.5
        return []

    monkeypatch.setattr(growth, "_grow_last_blocks", grow)
    report = growth._check_growth(model, None, ["a"], optimizer)
    in_place = change.startswith("inactive")
    assert report["same_objects"] is in_place and report["inactive_zero"] is not in_place
    assert report["max_abs_diff"] == 0.0
