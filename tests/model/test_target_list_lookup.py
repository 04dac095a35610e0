"""find_targets with a list (lorambo/model/targeting.py) looks the entries up among the names'
dotted suffixes: the same targets, in model order, as the definition (every module whose name is
the entry or ends with "." + the entry), on seeded random models and entry lists (full names,
suffixes, repeats, entries matching several modules), and the same error for an entry that
matches nothing."""

import random

import pytest
import torch.nn as nn

from lorambo.model.targeting import find_targets


def reference(model, entries):
    names = [n for n, _ in model.named_modules()]
    hits = {n for e in entries for n in names if n and (n == e or n.endswith("." + e))}
    return [n for n in names if n in hits]


def random_model(rng, depth=0):
    children = {}
    for i in range(rng.randint(1, 4)):
        name = rng.choice(["q", "k", "up", "0", "1", "q_k"])
        if depth == 2 or rng.random() < 0.5:
            children[name] = nn.Linear(2, 2)
        else:
            children[name] = random_model(rng, depth + 1)
    return nn.ModuleDict(children)


@pytest.mark.parametrize("seed", range(40))
def test_same_targets_as_the_definition(seed):
    rng = random.Random(seed)
    model = random_model(rng)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    entries = []
    for _ in range(rng.randint(1, 6)):
        parts = rng.choice(linears).split(".")
        entries.append(".".join(parts[rng.randrange(len(parts)):]))  # a suffix after a dot, or the full name
    # an entry that also names a container would be refused (not adaptable): keep to those that don't
    entries = [e for e in entries if all(isinstance(m, nn.Linear) for n, m in model.named_modules()
                                         if n and (n == e or n.endswith("." + e)))] or [linears[0]]
    assert find_targets(model, entries) == reference(model, entries)


def test_an_entry_that_matches_nothing_is_named():
    model = nn.ModuleDict({"a": nn.ModuleDict({"q": nn.Linear(2, 2)})})
    assert find_targets(model, ["q", "a.q"]) == ["a.q"]
    with pytest.raises(ValueError, match="entry 'x.q' matches no module"):
        find_targets(model, ["a.q", "x.q"])
