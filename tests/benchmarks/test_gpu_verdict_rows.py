"""benchmarks/gpu_targets.py judges each target on exactly the rows it names: one run (the latest
holding them) on one device, at the target's size, every cell a real time. Hand-built CSV rows:
mixed runs, a --quick run beside a full one, another GPU, empty / NaN / zero cells, duplicates."""

import pytest

from bench_scripts import load_bench

gpu_targets = load_bench("gpu_targets")
LARGE, POOL = "fwd+bwd M=8192 4096->4096 r=16", "rank 8: capacity 128 / capacity 8"
SAVED, REDUCE, ADAMW = ("saved for backward / peft", "ext reductions, 224 tensors: loop/ext",
                        "pool AdamW step, 224 pools: foreach/ext")


def _lora(run, case, provider, ms, dtype="bfloat16", device="NVIDIA H200", mode="fwd_bwd", saved="-1"):
    return dict(run=run, device=device, case=case, provider=provider, mode=mode, dtype=dtype, M="8192", K="4096",
                N="4096", ms_median=str(ms), saved_bytes=str(saved))


def _reduce(run, loop_ms, elements=None, device="NVIDIA H200"):
    elements = str(gpu_targets.REDUCE_ELEMENTS if elements is None else elements)
    return [dict(run=run, device=device, section="reduce", case=c, dtype=d, provider=p, M="224", K=elements,
                 ms_median=str(ms)) for (c, d), loop in loop_ms.items() for p, ms in (("python_loop", loop), ("ext", 1))]


def _adamw(run, pools, width, ext_ms, foreach_ms, device="NVIDIA H200"):
    return [dict(run=run, device=device, section="adamw", case=f"adamw_step_{pools}", dtype="float32", provider=p,
                 M=str(pools), K=str(width), ms_median=str(ms)) for p, ms in (("ext", ext_ms), ("foreach", foreach_ms))]


def _verdicts(lora=(), ext=()):
    return {v.target.name: v for v in gpu_targets.evaluate(list(lora), list(ext))}


ALL_REDUCTIONS = {("dot_224", "float32"): 9.0, ("dot_224", "bfloat16"): 8.0,
                  ("sq_norm_224", "float32"): 7.0, ("sq_norm_224", "bfloat16"): 5.5}


def test_the_adamw_target_reads_the_224_pool_run_not_a_later_quick_one():
    full = _adamw("2026-01-01T00:00:00Z", 224, 1024, 4.0, 6.0)  # 1.5x: a MISS
    quick = _adamw("2026-01-02T00:00:00Z", 16, 256, 1.0, 3.0)  # 3x at 16 pools
    adamw = _verdicts(ext=full + quick)[ADAMW]
    assert adamw.word == "MISS" and adamw.value == pytest.approx(1.5)
    alone = _verdicts(ext=quick)[ADAMW]
    assert alone.word == "MISS" and alone.value is None and "not measured" in alone.note


def test_the_reduction_target_needs_all_four_full_size_reductions_of_one_run():
    assert _verdicts(ext=_reduce("r1", ALL_REDUCTIONS))[REDUCE].value == pytest.approx(5.5)
    two = {k: v for k, v in ALL_REDUCTIONS.items() if k[0] == "dot_224"}  # the sq_norm rows are missing
    partial = _verdicts(ext=_reduce("r1", two))[REDUCE]
    assert partial.word == "MISS" and partial.value is None and "sq_norm_224 float32 python_loop missing" in partial.note
    # a later --quick run (the same 224 tensors at 1/8 the width) passing at 20x does not stand in
    quick = _reduce("r2", dict.fromkeys(ALL_REDUCTIONS, 20.0), elements=gpu_targets.REDUCE_ELEMENTS // 8)
    assert _verdicts(ext=_reduce("r1", ALL_REDUCTIONS) + quick)[REDUCE].value == pytest.approx(5.5)
    assert _verdicts(ext=quick)[REDUCE].value is None


def test_reduction_size_is_that_of_bench_ext():
    bench_ext = load_bench("bench_ext")
    assert gpu_targets.REDUCE_ELEMENTS == 32 * sum(16 * (o + i) for o, i in bench_ext.SEVEN_B)
    assert gpu_targets.REDUCE_TENSORS == 32 * len(bench_ext.SEVEN_B)


def test_a_ratio_never_pairs_rows_of_two_runs():
    old = [_lora("2026-01-01T00:00:00Z", "large", "base", 1.0), _lora("2026-01-01T00:00:00Z", "large", "lorambo", 1.5)]
    new = [_lora("2026-01-02T00:00:00Z", "large", "base", 2.0)]  # cut short before lorambo's row
    large = _verdicts(lora=old + new)[LARGE]
    assert large.word == "MISS" and large.value is None and "large lorambo missing" in large.note
    assert _verdicts(lora=old)[LARGE].value == pytest.approx(1.5)
    # the pool ratio too: the latest run holding either case
    pool = [_lora("r1", "pool_dense", "lorambo", 1.0), _lora("r1", "pool", "lorambo", 1.2),
            _lora("r2", "pool_dense", "lorambo", 1.3)]
    assert _verdicts(lora=pool)[POOL].value is None and _verdicts(lora=pool[:2])[POOL].value == pytest.approx(1.2)


def test_fp16_beside_bf16_comes_from_the_same_gpu():
    h100 = [_lora("r1", "large", p, ms, dtype="float16", device="NVIDIA H100") for p, ms in (("base", 1), ("lorambo", 3))]
    h200 = [_lora("r2", "large", p, ms) for p, ms in (("base", 1.0), ("lorambo", 1.05))]
    large = _verdicts(lora=h100 + h200)[LARGE]
    assert large.word == "PASS" and large.value == pytest.approx(1.05) and large.fp16 is None
    ext = _reduce("r1", dict.fromkeys(ALL_REDUCTIONS, 2.0), device="NVIDIA H100") + _reduce("r0", ALL_REDUCTIONS)
    assert _verdicts(ext=ext)[REDUCE].value == pytest.approx(2.0)  # the latest run's GPU, not an older pass


@pytest.mark.parametrize("cell", ["", "nan", "inf", "0", "-1", "n/a"])
def test_a_time_that_is_no_measurement_is_a_miss_not_a_crash_or_a_pass(cell):
    lora = [_lora("r1", "large", "base", cell), _lora("r1", "large", "lorambo", 1.0)]
    large = _verdicts(lora=lora)[LARGE]
    assert large.word == "MISS" and large.value is None and f"frozen layer ms_median {cell!r}" in large.note
    ext = _adamw("r1", 224, 1024, cell, 9.0)
    adamw = _verdicts(ext=ext)[ADAMW]
    assert adamw.word == "MISS" and adamw.value is None and f"ext ms_median {cell!r}" in adamw.note


@pytest.mark.parametrize("cell", ["", "nan", "-1", "12.5"])
def test_saved_bytes_that_are_no_count_are_a_miss(cell):
    lora = [_lora("r1", "large", "lorambo", 1.0, saved=cell), _lora("r1", "large", "peft", 1.0, saved="4096")]
    saved = _verdicts(lora=lora)[SAVED]
    assert saved.word == "MISS" and saved.value is None and f"lorambo saved_bytes {cell!r}" in saved.note


def test_saved_bytes_of_lorambo_and_peft_come_from_one_run():
    lora = [_lora("r1", "large", "lorambo", 1.0, saved="100"), _lora("r1", "large", "peft", 1.0, saved="4096"),
            _lora("r2", "large", "lorambo", 1.0, saved="9000")]  # a later run cut short before peft
    saved = _verdicts(lora=lora)[SAVED]
    assert saved.value is None and "peft missing" in saved.note
    assert _verdicts(lora=lora[:2])[SAVED].value == pytest.approx(100 / 4096)


def test_two_rows_for_one_measurement_in_one_run_are_ambiguous():
    lora = [_lora("r1", "large", "base", 1.0), _lora("r1", "large", "lorambo", 1.05),
            _lora("r1", "large", "lorambo", 2.0)]
    large = _verdicts(lora=lora)[LARGE]
    assert large.value is None and "large lorambo in 2 rows" in large.note
