"""lorambo.optim.AdamW's pool update against an oracle built from torch's own AdamW: every
active slot is a standalone float64 Parameter with a fresh torch.optim.AdamW created when the
slot is activated. Pools of odd shapes grow and shrink between steps, so slots carry different
step counts; runs on both update paths (tests/optim/conftest.py)."""

import pytest
import torch

import lorambo
from lorambo import LoRAMBoLinear
from lorambo.optim import AdamW
from lorambo.optim import adamw as adamw_module

SHAPES = [(7, 5, 4), (11, 7, 6), (13, 9, 8)]  # (in, out, capacity)


def _slot(pool, dim, j):
    return pool.detach().select(dim, j)


class _SlotOracle:
    """Fresh torch AdamW per active slot (float64 unless ``dtype``): the per-slot step count by
    construction."""

    def __init__(self, kwargs, dtype=torch.float64):
        self.kwargs, self.slots, self.dtype = kwargs, {}, dtype

    def sync(self, layers):
        """Slots activated since the last call get a fresh optimizer; dropped slots are forgotten."""
        for i, layer in enumerate(layers):
            for name, dim in (("lora_A", 0), ("lora_B", 1)):
                pool = getattr(layer, name)
                for j in range(pool.shape[dim]):
                    key = (i, name, j)
                    if j >= layer.rank:
                        self.slots.pop(key, None)
                    elif key not in self.slots:
                        p = torch.nn.Parameter(_slot(pool, dim, j).to(self.dtype).clone())
                        self.slots[key] = (p, torch.optim.AdamW([p], **self.kwargs))

    def step(self, layers):
        for (i, name, j), (p, opt) in self.slots.items():
            dim = 0 if name == "lora_A" else 1
            p.grad = getattr(layers[i], name).grad.select(dim, j).to(self.dtype).clone()
            opt.step()

    def max_error(self, reference):
        """The largest |difference| between this oracle's slots and ``reference``'s."""
        return max(float((p.detach().double() - reference.slots[key][0].detach().double()).abs().max())
                   for key, (p, _) in self.slots.items())

    def max_error_of(self, layers):
        """The largest |difference| between the pools' active slots and this oracle's."""
        out = 0.0
        for (i, name, j), (p, _) in self.slots.items():
            dim = 0 if name == "lora_A" else 1
            out = max(out, float((_slot(getattr(layers[i], name), dim, j).double() - p.detach().double()).abs().max()))
        return out

    def check(self, layers, rtol, atol):
        for (i, name, j), (p, _) in self.slots.items():
            dim = 0 if name == "lora_A" else 1
            torch.testing.assert_close(_slot(getattr(layers[i], name), dim, j).double(), p.detach(),
                                       rtol=rtol, atol=atol, msg=lambda m: f"layer {i} {name} slot {j}: {m}")


def _random_grads(layers, gen):
    for layer in layers:
        for param, dim in ((layer.lora_A, 0), (layer.lora_B, 1)):
            grad = torch.zeros_like(param)
            active = grad.narrow(dim, 0, layer.rank)
            active.copy_(torch.randn(active.shape, generator=gen, dtype=torch.float64))
            param.grad = grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("options", [dict(), dict(amsgrad=True), dict(maximize=True, weight_decay=0.3),
                                     dict(betas=(0.3, 0.5), eps=1e-3), dict(betas=(0.0, 0.99))])
def test_pool_steps_match_a_fresh_torch_adamw_per_slot(dtype, options):
    gen = torch.Generator().manual_seed(11)
    layers = [LoRAMBoLinear(torch.nn.Linear(i, o, dtype=dtype), rank=2, capacity=c) for i, o, c in SHAPES]
    for layer in layers:
        layer.lora_B.data[:, :2] = torch.randn(layer.out_features, 2, generator=gen, dtype=torch.float64).to(dtype)
    kwargs = dict(lr=3e-2, **options)
    opt = AdamW([p for layer in layers for p in layer.parameters() if p.requires_grad], **kwargs)
    oracle = _SlotOracle(kwargs)
    oracle.sync(layers)
    # step: new ranks (rank 0 and full capacity included; layer 0 shrinks to 1 and regrows)
    schedule = {3: (3, 1, 5), 6: (4, 0, 8), 9: (1, 3, 6), 10: (3, 3, 6)}
    for step in range(12):
        if step in schedule:
            for layer, r in zip(layers, schedule[step]):
                layer.set_rank(r, optimizer=opt, generator=torch.Generator().manual_seed(step))
            oracle.sync(layers)
        _random_grads(layers, gen)
        opt.step()
        oracle.step(layers)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-11, atol=1e-13)
    oracle.check(layers, **tol)
    for layer in layers:  # inactive slots stay exactly zero
        assert torch.count_nonzero(layer.lora_A[layer.rank:]) == 0
        assert torch.count_nonzero(layer.lora_B[:, layer.rank:]) == 0
    assert opt.state[layers[0].lora_A]["slot_step"].tolist() == [12, 2, 2, 0]
    assert opt.state[layers[2].lora_B]["slot_step"].tolist() == [12, 12, 9, 9, 9, 6, 0, 0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_pools_err_at_most_twice_torchs_own_adamw(dtype):
    """bf16/fp16 pools against the float64 per-slot oracle: the error is at most twice that of
    torch's own AdamW run per slot in the same dtype (the project's precision rule)."""
    gen = torch.Generator().manual_seed(5)
    layers = [LoRAMBoLinear(torch.nn.Linear(i, o, dtype=dtype), rank=2, capacity=c) for i, o, c in SHAPES]
    for layer in layers:
        layer.lora_B.data[:, :2] = torch.randn(layer.out_features, 2, generator=gen, dtype=torch.float64).to(dtype)
    kwargs = dict(lr=1e-2, weight_decay=0.1, eps=1e-4)  # an eps fp16 can hold, for torch's own run
    opt = AdamW([p for layer in layers for p in layer.parameters() if p.requires_grad], **kwargs)
    exact, own = _SlotOracle(kwargs), _SlotOracle(kwargs, dtype)
    for oracle in (exact, own):
        oracle.sync(layers)
    for step in range(12):
        if step == 5:
            for layer, r in zip(layers, (3, 4, 6)):
                layer.set_rank(r, optimizer=opt, generator=torch.Generator().manual_seed(step))
            for oracle in (exact, own):
                oracle.sync(layers)
        _random_grads(layers, gen)
        opt.step()
        for oracle in (exact, own):
            oracle.step(layers)
    ours, torchs = exact.max_error_of(layers), own.max_error(exact)
    assert torchs > 0 and ours <= 2 * torchs, (ours, torchs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_lora_first_step_with_default_eps_matches_the_float64_oracle(dtype):
    """A LoRA's first step: B = 0, so A's gradient is exactly 0. With the default eps (1e-8, which
    is 0 in float16) the foreach path formed the denominator in float16 and wrote 0/0 = NaN into
    every element of A."""
    layer = LoRAMBoLinear(torch.nn.Linear(12, 10), rank=3, capacity=4).to(dtype)
    kwargs = dict(lr=1e-2, weight_decay=0.1)
    opt = AdamW(layer.parameters(), **kwargs)
    oracle = _SlotOracle(kwargs)
    oracle.sync([layer])
    for step in range(2):  # the second step: B has moved, A's gradient is no longer 0
        layer.zero_grad()
        layer(torch.randn(6, 12, dtype=dtype)).float().square().sum().backward()
        assert layer.lora_A.grad.any() == (step > 0)
        opt.step()
        oracle.step([layer])
    assert layer.lora_A.isfinite().all() and layer.lora_B.isfinite().all()
    unit = 2.0 ** -11 if dtype == torch.float16 else 2.0 ** -8
    oracle.check([layer], rtol=4 * unit, atol=4 * unit * 1e-2)  # a few roundings of a step of lr


def test_lr_zero_leaves_pools_unchanged_and_counts_the_step():
    layer = LoRAMBoLinear(torch.nn.Linear(6, 5), rank=3, capacity=4)
    layer.lora_B.data[:, :3].normal_()  # the inactive slot stays zero, as lorambo keeps it
    opt = AdamW(layer.parameters(), lr=0.0, weight_decay=0.1)
    _random_grads([layer], torch.Generator().manual_seed(0))
    before = [p.detach().clone() for p in (layer.lora_A, layer.lora_B)]
    opt.step()
    assert all(torch.equal(p, q) for p, q in zip((layer.lora_A, layer.lora_B), before))
    assert opt.state[layer.lora_A]["slot_step"].tolist() == [1, 1, 1, 0]
    assert torch.count_nonzero(opt.state[layer.lora_A]["exp_avg"]) > 0


@pytest.mark.parametrize("dtype,contiguous,compiled", [(torch.float32, True, True), (torch.float64, True, True),
                                                      (torch.bfloat16, True, True), (torch.float32, False, False),
                                                      (torch.float16, True, False)])  # float32 moments
def test_which_path_a_step_takes(monkeypatch, pool_step_path, dtype, contiguous, compiled):
    calls = []
    real = adamw_module._compiled_pool_step
    monkeypatch.setattr(adamw_module, "_compiled_pool_step", lambda *a: (calls.append(1), real(*a)))
    layer = LoRAMBoLinear(torch.nn.Linear(6, 5, dtype=dtype), rank=2, capacity=4)
    opt = AdamW(layer.parameters(), lr=1e-2)
    _random_grads([layer], torch.Generator().manual_seed(0))
    if not contiguous:  # e.g. a gradient written through a transposed view
        layer.lora_B.grad = layer.lora_B.grad.t().contiguous().t()
    opt.step()
    assert len(calls) == (compiled and pool_step_path == "compiled")


@pytest.mark.parametrize("pool_step_path", ["compiled"], indirect=True)
def test_compiled_step_does_not_depend_on_the_thread_count(pool_step_path):
    results = []
    for threads in (1, 2):
        torch.manual_seed(3)
        layers = [LoRAMBoLinear(torch.nn.Linear(512, 384), rank=24, capacity=32) for _ in range(4)]
        opt = AdamW([p for layer in layers for p in (layer.lora_A, layer.lora_B)], lr=1e-2)
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            for step in range(3):
                _random_grads(layers, torch.Generator().manual_seed(step))
                opt.step()
        finally:
            torch.set_num_threads(previous)
        results.append([p.detach().clone() for layer in layers for p in (layer.lora_A, layer.lora_B)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("pool_step_path", ["compiled"], indirect=True)
def test_compiled_op_names_the_bad_argument(pool_step_path):
    op = torch.ops.lorambo.pool_adamw_
    p = torch.zeros(4, 6)
    state = lambda: [torch.zeros(4, 6)]  # noqa: E731
    steps = [torch.zeros(4)]

    def call(params=None, grads=None, dims=(0,), ranks=(2,), slot_steps=None, lr=1e-2):
        op(params or [p], grads or state(), state(), state(), [], slot_steps or steps, list(dims), list(ranks),
           lr, 0.9, 0.999, 1e-8, 0.0, False)

    with pytest.raises(RuntimeError, match=r"ranks\[0\] = 5 is outside \[0, 4\]"):
        call(ranks=(5,))
    with pytest.raises(RuntimeError, match=r"slot_dims\[0\] = 2"):
        call(dims=(2,))
    with pytest.raises(RuntimeError, match=r"grads\[0\] has shape \[4, 5\]"):
        call(grads=[torch.zeros(4, 5)])
    with pytest.raises(RuntimeError, match=r"grads\[0\] is not contiguous"):
        call(grads=[torch.zeros(6, 4).t()])
    with pytest.raises(RuntimeError, match=r"slot_steps\[0\] must be a contiguous float32 vector of 6"):
        call(dims=(1,))
    with pytest.raises(RuntimeError, match=r"params\[0\] has dtype Long"):
        call(params=[p.long()], grads=[torch.zeros(4, 6, dtype=torch.long)])
    with pytest.raises(RuntimeError, match="lr must be finite"):
        call(lr=float("nan"))
    assert torch.count_nonzero(p) == 0 and steps[0].tolist() == [0, 0, 0, 0]  # nothing written on a refusal
