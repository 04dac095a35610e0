"""_candidate_modules (lorambo/model/targeting.py) leaves out what is inside a LoRAMBoLinear by
its ancestors' names: the same modules as the definition (a name that continues a LoRAMBoLinear's
name with "."), on seeded random nested models with adapters at every depth and shared modules."""

import random

import pytest
import torch.nn as nn

from lorambo.model.targeting import _candidate_modules
from lorambo.nn import LoRAMBoLinear


def reference(model):
    adapters = [n for n, m in model.named_modules() if isinstance(m, LoRAMBoLinear)]
    return {n: m for n, m in model.named_modules() if not any(n.startswith(a + ".") for a in adapters)}


def random_model(rng, depth=0):
    children = {}
    for i in range(rng.randint(1, 4)):
        r = rng.random()
        name = rng.choice(["a", "ab", "b", "q", "0"]) + str(i)
        if r < 0.3 or depth == 3:
            children[name] = nn.Linear(2, 2)
        elif r < 0.55:
            children[name] = LoRAMBoLinear(nn.Linear(2, 2), rank=1)
        else:
            children[name] = random_model(rng, depth + 1)
    module = nn.ModuleDict(children)
    if rng.random() < 0.2 and len(children) > 1:  # a module held twice (named once by named_modules)
        first = next(iter(children))
        module[first + "_again"] = children[first]
    return module


@pytest.mark.parametrize("seed", range(30))
def test_same_modules_as_the_definition(seed):
    model = random_model(random.Random(seed))
    found = _candidate_modules(model)
    expected = reference(model)
    assert list(found) == list(expected)
    assert all(found[n] is expected[n] for n in found)


def test_root_adapter_and_names_that_only_share_a_prefix():
    model = nn.ModuleDict({"q": LoRAMBoLinear(nn.Linear(2, 2), rank=1), "q_proj": nn.Linear(2, 2),
                           "qq": nn.ModuleDict({"q": nn.Linear(2, 2)})})
    assert list(_candidate_modules(model)) == ["", "q", "q_proj", "qq", "qq.q"]
    root = LoRAMBoLinear(nn.Linear(2, 2), rank=1)
    assert list(_candidate_modules(root)) == list(reference(root))  # a root adapter: no name continues ""
