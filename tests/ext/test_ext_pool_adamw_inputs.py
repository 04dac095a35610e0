"""lorambo::pool_adamw_'s input contract: tensors sharing memory with a tensor it writes are
refused (the pools run as parallel items, and each element's update reads p, g, m, v before
writing them), so is a meta tensor in any list; a clear error, before anything is written.
Gradients, only read, may share memory."""

import re

import pytest
import torch
from ext_testutil import needs_ext

pytestmark = needs_ext

LR, BETAS, EPS, WD = 1e-2, (0.9, 0.99), 1e-8, 0.1
ROLES = ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "slot_steps")


def _lists(gen, count=2):
    def rnd(*shape):
        return torch.randn(*shape, generator=gen)
    return {"params": [rnd(4, 6) for _ in range(count)], "grads": [rnd(4, 6) for _ in range(count)],
            "exp_avgs": [rnd(4, 6) for _ in range(count)], "exp_avg_sqs": [rnd(4, 6).abs() for _ in range(count)],
            "max_exp_avg_sqs": [rnd(4, 6).abs() for _ in range(count)],
            "slot_steps": [torch.zeros(4) for _ in range(count)]}


def _step(lists, ranks=(3, 3)):
    n = len(lists["params"])
    torch.ops.lorambo.pool_adamw_(*(lists[r] for r in ROLES), [0] * n, list(ranks[:n]), LR, *BETAS, EPS, WD, False)


# (role a, index a, role b, index b): b is made to share a's memory; the error names both
CASES = [("params", 0, "params", 1), ("exp_avgs", 0, "exp_avg_sqs", 0), ("params", 0, "exp_avgs", 0),
         ("params", 1, "grads", 1), ("exp_avg_sqs", 1, "max_exp_avg_sqs", 1), ("slot_steps", 0, "slot_steps", 1),
         ("exp_avgs", 0, "grads", 1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}{c[1]}-{c[2]}{c[3]}")
def test_written_tensor_sharing_memory_is_refused_before_any_write(case):
    role_a, i, role_b, j = case
    lists = _lists(torch.Generator().manual_seed(len(role_a) + 7 * j))
    lists[role_b][j] = lists[role_a][i].view(lists[role_b][j].shape)
    before = {r: [t.clone() for t in lists[r]] for r in ROLES}
    names = sorted([f"{role_a}[{i}]", f"{role_b}[{j}]"])
    pattern = r"lorambo::pool_adamw_: (\w+\[\d\]) and (\w+\[\d\]) share memory"
    with pytest.raises(RuntimeError, match=pattern) as err:
        _step(lists)
    assert sorted(re.search(pattern, str(err.value)).groups()) == names
    for r in ROLES:
        assert all(torch.equal(t, b) for t, b in zip(lists[r], before[r])), f"{r} written before the error"


def test_partial_overlap_of_two_views_is_refused():
    lists = _lists(torch.Generator().manual_seed(3))
    base = torch.randn(7, 6)
    lists["exp_avgs"][0], lists["exp_avgs"][1] = base[:4], base[3:]
    with pytest.raises(RuntimeError, match=r"exp_avgs\[0\] and exp_avgs\[1\] share memory"):
        _step(lists)


def test_shared_gradient_is_read_only_and_allowed():
    gen = torch.Generator().manual_seed(5)
    lists = _lists(gen)
    lists["grads"][1] = lists["grads"][0]
    lists["max_exp_avg_sqs"] = []
    want = []
    for p, g, m, v in zip(lists["params"], lists["grads"], lists["exp_avgs"], lists["exp_avg_sqs"]):
        # the first step of torch's AdamW in float64 on all rows (ranks = capacity)
        p64 = p.double().clone().requires_grad_(True)
        p64.grad = g.double()
        opt = torch.optim.AdamW([p64], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)
        opt.state[p64] = {"step": torch.tensor(0.0, dtype=torch.float64), "exp_avg": m.double().clone(),
                          "exp_avg_sq": v.double().clone()}
        opt.step()
        want.append(p64.detach())
    _step(lists, ranks=(4, 4))
    for got, exp in zip(lists["params"], want):
        torch.testing.assert_close(got.double(), exp, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("amsgrad", [False, True])
def test_opcheck(amsgrad):
    lists = _lists(torch.Generator().manual_seed(9))
    if not amsgrad:
        lists["max_exp_avg_sqs"] = []
    lists["slot_steps"][1] = torch.zeros(6)  # pool 1's slots are its 6 columns
    torch.library.opcheck(torch.ops.lorambo.pool_adamw_.default,
                          (*(lists[r] for r in ROLES), [0, 1], [3, 2], LR, *BETAS, EPS, WD, False))


@pytest.mark.parametrize("role", [r for r in ROLES if r != "params"])
def test_a_meta_tensor_in_any_list_is_refused_not_skipped(role):
    # one meta tensor sends the call to the fake implementation, which used to check params only
    # and return without updating anything
    lists = _lists(torch.Generator().manual_seed(11))
    lists[role][1] = torch.empty_like(lists[role][1], device="meta")
    before = [t.clone() for t in lists["params"]]
    with pytest.raises(RuntimeError, match=rf"lorambo::pool_adamw_: {role}\[1\] is on meta but the other tensors "
                                           r"are on cpu"):
        _step(lists)
    assert all(torch.equal(t, b) for t, b in zip(lists["params"], before))


@pytest.mark.parametrize("eps, weight_decay, match", [
    (float("nan"), WD, r"eps must be >= 0, got nan"), (-1e-8, WD, r"eps must be >= 0, got -1e-08"),
    (EPS, float("nan"), r"weight_decay must be >= 0, got nan"), (EPS, -0.1, r"weight_decay must be >= 0, got -0.1")])
def test_eps_and_weight_decay_that_torch_adamw_refuses_are_refused_before_any_write(eps, weight_decay, match):
    """torch.optim.AdamW (and so lorambo.optim.AdamW) refuses them at construction; called
    directly, the op turned every active slot of the pools into nan."""
    lists = _lists(torch.Generator().manual_seed(5))
    before = {r: [t.clone() for t in lists[r]] for r in ROLES}
    with pytest.raises(RuntimeError, match=rf"lorambo::pool_adamw_: {match}"):
        torch.ops.lorambo.pool_adamw_(*(lists[r] for r in ROLES), [0, 0], [3, 3], LR, *BETAS, eps, weight_decay,
                                      False)
    for r in ROLES:
        assert all(torch.equal(t, b) for t, b in zip(lists[r], before[r])), f"{r} written before the error"


def test_a_written_tensor_inside_a_gradient_is_refused_past_a_shorter_gradient_in_between():
    """buf[0:40] is grads[0]; grads[1] = buf[4:12] (read-only sharing, allowed) ends before
    exp_avgs[1] = buf[16:24] starts, but exp_avgs[1] still lies inside grads[0]: the overlap check
    compares each span with the furthest-reaching earlier one, not merely the previous one."""
    gen = torch.Generator().manual_seed(21)
    buf = torch.randn(40, generator=gen)
    grads = [buf[:40].view(10, 4), buf[4:12].view(2, 4)]
    params = [torch.randn(10, 4, generator=gen), torch.randn(2, 4, generator=gen)]
    exp_avgs = [torch.randn(10, 4, generator=gen), buf[16:24].view(2, 4)]
    exp_avg_sqs = [torch.rand(10, 4, generator=gen), torch.rand(2, 4, generator=gen)]
    before = [t.clone() for t in params + [buf]]
    with pytest.raises(RuntimeError, match=r"^lorambo::pool_adamw_: grads\[0\] and exp_avgs\[1\] share memory"):
        torch.ops.lorambo.pool_adamw_(params, grads, exp_avgs, exp_avg_sqs, [], [torch.zeros(10), torch.zeros(4)],
                                      [0, 1], [3, 2], LR, *BETAS, EPS, WD, False)
    assert all(torch.equal(t, want) for t, want in zip(params + [buf], before))


@pytest.mark.parametrize("length", [3, 5])
def test_slot_steps_of_another_length_than_the_capacity_are_refused_before_any_write(length):
    # one count per slot: a shorter vector was read past its end, a longer one silently accepted
    lists = _lists(torch.Generator().manual_seed(23))
    lists["slot_steps"][1] = torch.zeros(length)
    before = [t.clone() for role in ROLES for t in lists[role]]
    with pytest.raises(RuntimeError, match=rf"^lorambo::pool_adamw_: slot_steps\[1\] must be a contiguous float32 "
                                           rf"vector of 4 slot counts, got Float \[{length}\]"):
        _step(lists)
    assert all(torch.equal(t, want) for t, want in zip((t for role in ROLES for t in lists[role]), before))
