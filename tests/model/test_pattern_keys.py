"""PatternKeys (lorambo/model/patterns.py) finds the first key peft would match, by suffix
lookups for plain keys: the same key as peft's own regular expression on every name, checked
against that expression on seeded random keys and names (plain keys with "." wildcards, regex
keys, names with newlines), and on an exported adapter of more keys than ``re`` caches."""

import random
import re

import pytest
import torch.nn as nn

import lorambo
from lorambo.model.patterns import PatternKeys, check_alpha_pattern, pattern_lookup


def peft_first(keys, name):
    """peft's rule, written out: the first key k with re.match(rf"(.*\\.)?({k})$", name)."""
    return next((k for k in keys if re.match(rf"(.*\.)?({k})$", name)), None)


PARTS = ["a", "b", "q", "qa", "0", "1", "12", "x_y", "a.b"]


def random_name(rng):
    name = ".".join(rng.choice(PARTS) for _ in range(rng.randint(1, 4)))
    if rng.random() < 0.05:
        name = name.replace(".", "\n", 1) if rng.random() < 0.5 else name + "\n"
    if rng.random() < 0.05:
        name = name.replace(".", "_", 1)  # "." in a key matches it
    return name


def random_key(rng, names):
    r = rng.random()
    if r < 0.4:  # a suffix of a name after a dot, as export_peft writes (its dots match any character)
        parts = rng.choice(names).split(".")
        return ".".join(parts[rng.randrange(len(parts)):])
    if r < 0.6:
        return ".".join(rng.choice(PARTS) for _ in range(rng.randint(1, 3)))
    if r < 0.7:
        return rng.choice(["q", "a", "0", "1"]) + "." + rng.choice(["q", "a", "12"])  # one dot, two-character wildcard spots
    return rng.choice([r"q\w*", r"(a|b)\.\d+", r".*", r"a\.b", r"\d", r"x_y|q", "", r"[ab]", r"1\d"])


@pytest.mark.parametrize("seed", range(40))
def test_first_key_is_peft_s(seed):
    rng = random.Random(seed)
    names = list({random_name(rng) for _ in range(rng.randint(1, 30))})
    keys = list(dict.fromkeys(random_key(rng, names) for _ in range(rng.randint(1, 25))))
    found = PatternKeys(keys)
    for name in names + [random_name(rng) for _ in range(20)]:
        assert found.first(name) == peft_first(keys, name), (keys, name)
    reference = {i for i, k in enumerate(keys) if re.fullmatch(r"[A-Za-z0-9_.]+", k)
                 and any(re.match(rf"(.*\.)?({k})$", n) for n in names)}
    assert found.plain_matched(names) == reference


def test_export_keys_beyond_re_cache():
    # 700 layers' names as export_peft writes them (longest first), more than re's 512 cached patterns
    names = [f"model.layers.{i}.{p}" for i in range(100) for p in ("q", "k", "v", "o", "up", "down", "gate")]
    pattern = {n: len(n) % 7 + i % 3 for i, n in enumerate(sorted(names, key=len, reverse=True))}
    value = pattern_lookup(pattern, -1)
    compiled = [(k, re.compile(rf"(.*\.)?({k})$")) for k in pattern]  # peft's rule, each compiled once
    for name in names + ["layers.3.q", "model.layers.3.qq", "model_layers.3.q", "x.model.layers.99.gate"]:
        key = next((k for k, c in compiled if c.match(name)), None)
        assert value(name) == (-1 if key is None else pattern[key]), name


def test_invalid_key_raises_where_re_match_would():
    value = pattern_lookup({"a": 1, "(": 2}, 0)
    assert value("m.a") == 1  # the first key matches: peft never compiles the second
    with pytest.raises(re.error):
        value("m.b")


def test_check_alpha_pattern_names_the_unmatched_key():
    check_alpha_pattern({"a.b": 2.0, r"q\d": 3.0}, ["m.aXb", "q1"])
    with pytest.raises(ValueError, match="'c.d' matches none"):
        check_alpha_pattern({"a.b": 2.0, "c.d": 3.0}, ["m.a.b", "m.c"])
    with pytest.raises(ValueError, match=r"'q\\\\d' matches none"):
        check_alpha_pattern({"a.b": 2.0, r"q\d": 3.0}, ["m.a.b", "m.qq"])


def test_import_of_many_layers_keeps_each_rank(tmp_path):
    model = nn.Sequential(*(nn.Linear(4, 4) for _ in range(600)))
    ranks = {str(i): 1 + i % 4 for i in range(600)}
    lorambo.configure_model(model, ranks, capacity=4)
    lorambo.export_peft(model, tmp_path)
    fresh = lorambo.import_peft(nn.Sequential(*(nn.Linear(4, 4) for _ in range(600))), tmp_path)
    assert {n: m.rank for n, m in lorambo.lora_layers(fresh).items()} == ranks
