"""export_peft's target_modules (lorambo/adapters/peft_export.py: _target_modules): the list of
names, or an exact regex when another module's name ends with "." + a target; the same choice as
that definition written out, on seeded random module trees and target sets."""

import random
import re

import pytest
import torch.nn as nn

from lorambo.adapters.peft_export import _target_modules


def reference(model, names):
    others = [n for n, _ in model.named_modules() if n not in names]
    if any(o.endswith("." + n) for o in others for n in names):
        return "(" + "|".join(re.escape(n) for n in names) + ")"
    return names


def random_tree(rng, depth=0):
    children = {}
    for _ in range(rng.randint(1, 3)):
        name = rng.choice(["q", "k", "a", "b", "0", "1"])
        children[name] = nn.Linear(1, 1) if depth == 3 or rng.random() < 0.3 else random_tree(rng, depth + 1)
    return nn.ModuleDict(children)


@pytest.mark.parametrize("seed", range(40))
def test_same_choice_as_the_definition(seed):
    rng = random.Random(seed)
    model = random_tree(rng)
    modules = [n for n, _ in model.named_modules() if n]
    names = rng.sample(modules, rng.randint(1, len(modules)))
    assert _target_modules(model, names) == reference(model, names)


def test_a_target_that_ends_another_name_gets_the_regex():
    model = nn.ModuleDict({"a": nn.ModuleDict({"q": nn.Linear(1, 1)}), "q": nn.Linear(1, 1),
                           "xq": nn.Linear(1, 1)})
    assert _target_modules(model, ["q"]) == "(q)"  # "a.q" ends with ".q"
    assert _target_modules(model, ["a.q", "xq"]) == ["a.q", "xq"]  # "q" does not end with ".xq"
