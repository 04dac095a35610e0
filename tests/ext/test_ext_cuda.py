"""CUDA implementations of the lorambo ops against the CPU ones.

Without a CUDA device (or without the extension) these tests are skipped; .ci/compile_cuda.sh
still compiles the CUDA sources there. With a CUDA device, an extension built without CUDA is a
failure, not a skip: a GPU machine whose build silently lost nvcc must not report green.
"""

import pytest
import torch
from ext_testutil import EXT, FLOAT_DTYPES, check_within_accumulation_bound, generator, random_dtype, random_shape

from lorambo.ext import ops as ext_ops
from lorambo.ops.ext_linear import dropout_mask_ext, lora_linear_ext
from lorambo.ops.lora_linear_ref import lora_linear_reference


def cuda_build_problem(cuda_available: bool, ext) -> tuple[str, str] | None:
    """("skip" | "fail", why) when the CUDA tests cannot run, None when they can."""
    if not cuda_available:
        return "skip", "needs a CUDA device"
    if ext is None:  # not built at all (LORAMBO_SKIP_EXT=1): optional, as for every ext test
        return "skip", "compiled extension lorambo._C not built"
    if not getattr(ext, "with_cuda", False):
        return "fail", ("a CUDA device is present but lorambo._C was built without CUDA (no nvcc at build "
                        "time?); rebuild it with CUDA")
    return None


@pytest.fixture
def cuda_ext():
    problem = cuda_build_problem(torch.cuda.is_available(), EXT)
    if problem is not None:
        action, why = problem
        (pytest.skip if action == "skip" else pytest.fail)(why)


def test_a_gpu_machine_with_a_cpu_only_build_fails_instead_of_skipping():
    class CpuOnlyBuild:
        with_cuda = False

    class CudaBuild:
        with_cuda = True

    assert cuda_build_problem(False, CudaBuild())[0] == "skip"
    assert cuda_build_problem(True, CpuOnlyBuild())[0] == "fail"
    assert cuda_build_problem(True, None)[0] == "skip"
    assert cuda_build_problem(True, CudaBuild()) is None


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
def test_reductions_are_within_the_accumulation_bound_of_float64():
    gen = generator()
    xs = [torch.randn(random_shape(gen), generator=gen).to(random_dtype(gen)) for _ in range(300)]
    xs.append(torch.randn(300_001, generator=gen))
    ys = [torch.randn(x.shape, generator=gen).to(random_dtype(gen)) for x in xs]
    gpu = ext_ops.multi_dot([x.cuda() for x in xs], [y.cuda() for y in ys])
    assert gpu.device.type == "cuda"
    check_within_accumulation_bound(gpu, xs, ys)
    check_within_accumulation_bound(ext_ops.multi_sq_norm([x.cuda() for x in xs]), xs, xs)
    rows = [torch.randn(4, 1000, generator=gen), torch.randn(4, 3, 5, generator=gen)]
    check_within_accumulation_bound(ext_ops.multi_dot([r.cuda() for r in rows], [r.cuda() for r in rows], rows=4),
                                    rows, rows, rows=4)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_a_sum_of_4m_squares_on_cuda_is_within_the_accumulation_bound(dtype):
    """A float32 total per thread over a whole chunk rounds every add relative to a growing sum of
    squares; blocks of 8 handed to float64 keep the bound the CPU kernel meets."""
    gen = generator()
    xs = [torch.randn(n, generator=gen).to(dtype) for n in (1 << 22, (1 << 22) + 16 * 5 + 7)]
    on_gpu = [x.cuda() for x in xs]
    check_within_accumulation_bound(ext_ops.multi_sq_norm(on_gpu), xs, xs)
    check_within_accumulation_bound(ext_ops.multi_dot(on_gpu, on_gpu), xs, xs)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dist", ["rademacher", "uniform", "gaussian"])
def test_probe_streams_agree_between_cpu_and_cuda(dtype, dist):
    shapes = [(1000,), (3, 0), (17, 33), (70_001,)]
    offsets = [5, 2**40, 2**41 + 3, 2**42]
    cpu = [torch.empty(s, dtype=dtype) for s in shapes]
    gpu = [torch.empty(s, dtype=dtype, device="cuda") for s in shapes]
    torch.ops.lorambo.probe_fill_(cpu, 2**35 + 1, offsets, dist)
    torch.ops.lorambo.probe_fill_(gpu, 2**35 + 1, offsets, dist)
    for c, g in zip(cpu, gpu):
        if dist == "gaussian":  # double libm vs CUDA double math: ulp-level, rounded to the dtype
            torch.testing.assert_close(g.cpu(), c, rtol=2e-7 if dtype != torch.float64 else 1e-14, atol=1e-7)
        else:
            assert torch.equal(g.cpu(), c)


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
def test_dropout_masks_agree_between_cpu_and_cuda():
    x = torch.empty(300, 257)
    assert torch.equal(dropout_mask_ext(x.cuda(), 0.3, 77).cpu(), dropout_mask_ext(x, 0.3, 77))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
def test_pool_remap_matches_the_cpu():
    gen = generator()
    tensors, dims, maps = [], [], []
    for i in range(60):
        cap = int(torch.randint(1, 40, (), generator=gen))
        width = 3000 if i % 9 == 0 else int(torch.randint(0, 50, (), generator=gen))
        shape, dim = [((cap, width), 0), ((width, cap), 1), ((3, cap, 4), 1)][i % 3]
        tensors.append(torch.randn(shape, generator=gen).to(random_dtype(gen)))
        dims.append(dim)
        maps.append(torch.randint(-1, cap, (cap,), generator=gen))
    gpu = [t.cuda() for t in tensors]
    ext_ops.pool_remap_(tensors, dims, maps)
    ext_ops.pool_remap_(gpu, dims, maps)
    assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu, tensors))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_lora_linear_on_cuda_matches_cpu(p):
    def make(device):
        gen = torch.Generator().manual_seed(3)
        shapes = [(37, 48), (40, 48), (40,), (16, 48), (40, 16)]
        t = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
        return [v.to(device).requires_grad_(i in (0, 3, 4)) for i, v in enumerate(t)]

    out = {}
    for device in ("cpu", "cuda"):
        x, w, b, a, bb = make(device)
        y = lora_linear_ext(x, w, b, a, bb, 9, 0.5, p, 5)
        grads = torch.autograd.grad(y.square().sum(), (x, a, bb))
        out[device] = [y.detach().cpu()] + [g.cpu() for g in grads]
    for c, g in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(g, c, rtol=1e-10, atol=1e-10)
    if p == 0.0:
        x, w, b, a, bb = make("cuda")
        torch.testing.assert_close(lora_linear_ext(x, w, b, a, bb, 9, 0.5),
                                   lora_linear_reference(x, w, b, a, bb, 9, 0.5))


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
def test_mixed_devices_are_rejected():
    with pytest.raises(RuntimeError, match=r"xs\[1\] is on cuda:0 but the other tensors are on cpu"):
        ext_ops.multi_sq_norm([torch.ones(3), torch.ones(3, device="cuda")])


@pytest.mark.gpu
@pytest.mark.usefixtures("cuda_ext")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [dict(amsgrad=False, maximize=False, lr=1e-2, weight_decay=0.1),
                                     dict(amsgrad=True, maximize=True, lr=3e-2, weight_decay=0.0),
                                     dict(amsgrad=False, maximize=False, lr=0.0, weight_decay=0.1)])
def test_pool_adamw_on_cuda_matches_cpu(dtype, options):
    """Five steps of lorambo::pool_adamw_ on pools of odd shapes, ranks 0..capacity, slots of
    different ages: the CUDA kernel against the CPU one, every element of every tensor."""
    gen = torch.Generator().manual_seed(7)
    # the last two have more active elements than one work item (4096), split inside a slot / row
    shapes = [(8, 37), (29, 8), (6, 300), (300, 6), (4, 5), (16, 700), (700, 16)]
    dims, ranks = [0, 1, 0, 1, 1, 0, 1], [3, 8, 6, 1, 0, 9, 13]
    amsgrad = options["amsgrad"]

    def fresh():
        params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
        moments = [[torch.rand(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
                   for _ in range(3 if amsgrad else 2)]
        steps = [torch.randint(0, 50, (s[d],), generator=gen).float() for s, d in zip(shapes, dims)]
        return params, moments, steps

    params, moments, steps = fresh()
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes] for _ in range(5)]
    state = {"cpu": ([t.clone() for t in params], [[t.clone() for t in ms] for ms in moments],
                     [t.clone() for t in steps])}
    state["cuda"] = tuple([[t.cuda() for t in ts] if not isinstance(ts[0], list) else [[t.cuda() for t in m] for m in ts]
                           for ts in state["cpu"]])
    for device, (ps, ms, st) in state.items():
        for g in grads:
            torch.ops.lorambo.pool_adamw_(ps, [t.to(device) for t in g], ms[0], ms[1], ms[2] if amsgrad else [], st,
                                          dims, ranks, options["lr"], 0.9, 0.999, 1e-8, options["weight_decay"],
                                          options["maximize"])
    # float32 math on both sides; bf16/fp16 round once per element, so a last-bit difference in the
    # float32 result may show as one unit of the stored dtype
    tol = {torch.float32: dict(rtol=2e-6, atol=1e-7), torch.float64: dict(rtol=1e-12, atol=1e-14),
           torch.bfloat16: dict(rtol=8e-3, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-6)}[dtype]
    cpu, gpu = state["cpu"], state["cuda"]
    for c, g in zip(cpu[0] + [t for m in cpu[1] for t in m], gpu[0] + [t for m in gpu[1] for t in m]):
        torch.testing.assert_close(g.cpu(), c, **tol)
    assert all(torch.equal(g.cpu(), c) for g, c in zip(gpu[2], cpu[2]))  # slot counts
    assert cpu[2][0].tolist()[:3] == [s + 5 for s in steps[0].tolist()[:3]]
    assert torch.equal(cpu[0][4], params[4])  # rank 0: untouched
    assert torch.equal(cpu[0][0], params[0]) == (options["lr"] == 0.0)  # lr 0: nothing moves
