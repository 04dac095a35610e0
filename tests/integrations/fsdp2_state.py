"""The comparison of two processes' (or two moments') full model state that the FSDP2 failure
tests share: ranks, and every parameter, gradient and optimizer state tensor, bit for bit."""

import torch


def assert_same_state(got, want, what, ids=True):
    """``ids``: compare slot ids too (a process's own counter makes them: not across processes)."""
    assert got["ranks"] == want["ranks"] and (not ids or got["ids"] == want["ids"]), what
    for part in ("params", "grads"):
        assert got[part].keys() == want[part].keys(), (what, part)
        for name, value in want[part].items():
            assert torch.equal(got[part][name], value), (what, part, name)
    assert got["opt"].keys() == want["opt"].keys(), what
    for name, state in want["opt"].items():
        assert got["opt"][name].keys() == state.keys(), (what, name)
        for key, value in state.items():
            assert torch.equal(got["opt"][name][key], value), (what, name, key)
