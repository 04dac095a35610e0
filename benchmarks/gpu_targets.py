"""The speed targets of docs/gpu_check.md, judged from the benchmark CSVs of one run.

Every ratio is lorambo over a comparison measured in the same run and dtype (bf16 decides the
verdict; fp16 is shown beside it when measured). A target with no measurement is a MISS that
says what was not measured: the verdict never reads a missing number as a pass.

Rows are ``csv.DictReader`` dicts: benchmarks/bench_lora_linear.py (``case`` labels large, mid,
wide, pool_dense, pool, decode) and benchmarks/bench_ext.py (sections ``reduce`` and ``adamw``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Target:
    name: str
    limit: float
    at_least: bool  # True: the measured value must be >= limit (a speed-up); else <= limit
    measure: Callable[[list[dict], list[dict], str], tuple[float | None, str]]  # (value, how / why not)

    @property
    def goal(self) -> str:
        return f"{'>=' if self.at_least else '<='} {self.limit:g}x"


@dataclass(frozen=True)
class Verdict:
    target: Target
    value: float | None  # the decisive (bf16) value
    fp16: float | None
    note: str

    @property
    def passed(self) -> bool:
        if self.value is None or math.isnan(self.value):
            return False
        return self.value >= self.target.limit if self.target.at_least else self.value <= self.target.limit

    @property
    def word(self) -> str:
        return "PASS" if self.passed else "MISS"


def _ms(rows, dtype, case, provider, mode):
    hits = [r for r in rows if r["dtype"] == dtype and r["case"] == case and r["provider"] == provider
            and r["mode"] == mode]
    return float(hits[-1]["ms_median"]) if hits else None


def _base_ms(rows, dtype, case, mode):
    """The frozen layer at ``case``'s shape (measured once per shape, under the first case with it)."""
    shape = next(((r["M"], r["K"], r["N"]) for r in rows if r["case"] == case and r["dtype"] == dtype), None)
    hits = [r for r in rows if r["dtype"] == dtype and r["provider"] == "base" and r["mode"] == mode
            and (r["M"], r["K"], r["N"]) == shape]
    return float(hits[-1]["ms_median"]) if hits else None


def time_vs_base(case: str, mode: str):
    def measure(lora, ext, dtype):
        ours, base = _ms(lora, dtype, case, "lorambo", mode), _base_ms(lora, dtype, case, mode)
        if ours is None or base is None:
            return None, f"not measured ({case}: lorambo {_said(ours)}, frozen layer {_said(base)})"
        return ours / base, f"{ours:.3f} / {base:.3f} ms"
    return measure


def pool_vs_dense(lora, ext, dtype):
    pool, dense = _ms(lora, dtype, "pool", "lorambo", "fwd_bwd"), _ms(lora, dtype, "pool_dense", "lorambo", "fwd_bwd")
    if pool is None or dense is None:
        return None, f"not measured (capacity-128 {_said(pool)}, capacity-8 {_said(dense)})"
    return pool / dense, f"{pool:.3f} / {dense:.3f} ms"


def saved_vs_peft(lora, ext, dtype):
    """Bytes saved for backward at the ``large`` case, lorambo over peft (peft-style when the
    library was not measured)."""
    def saved(provider):
        hits = [r for r in lora if r["dtype"] == dtype and r["case"] == "large" and r["provider"] == provider
                and r["mode"] == "fwd_bwd" and int(r["saved_bytes"]) >= 0]
        return int(hits[-1]["saved_bytes"]) if hits else None

    ours = saved("lorambo")
    other = next(((p, s) for p in ("peft", "peft_style") if (s := saved(p)) is not None), None)
    if ours is None or other is None:
        return None, f"not measured (lorambo {_said(ours)}, peft {_said(other)})"
    name, theirs = other
    if theirs == 0:
        return (1.0 if ours == 0 else math.inf), f"{ours} B vs {name} 0 B"
    if theirs < 10 * 1024:
        return ours / theirs, f"{ours} / {theirs} B vs {name}"
    return ours / theirs, f"{ours / 1024:.0f} / {theirs / 1024:.0f} KiB vs {name}"


def ext_speedup(lora, ext, dtype):
    """The smallest python_loop / ext time over the 224-tensor reductions (every dtype measured)."""
    ratios = []
    for case in sorted({r["case"] for r in ext if r["section"] == "reduce"}):
        for dt in sorted({r["dtype"] for r in ext if r["section"] == "reduce" and r["case"] == case}):
            times = {r["provider"]: float(r["ms_median"]) for r in ext
                     if r["section"] == "reduce" and r["case"] == case and r["dtype"] == dt}
            if "ext" in times and "python_loop" in times:
                ratios.append((times["python_loop"] / times["ext"], f"{case} {dt}"))
    if not ratios:
        return None, "not measured (no extension reduction rows)"
    worst = min(ratios)
    return worst[0], f"worst of {len(ratios)}: {worst[1]}"


def adamw_speedup(lora, ext, dtype):
    """foreach / ext time of one lorambo.optim.AdamW step over 224 pools (bench_ext section adamw):
    whether the extension's CUDA pool update earns its place in ``auto``."""
    times = {r["provider"]: float(r["ms_median"]) for r in ext if r["section"] == "adamw"}
    if "ext" not in times or "foreach" not in times:
        return None, "not measured (no pool AdamW rows)"
    return times["foreach"] / times["ext"], f"foreach {times['foreach']:.2f} ms / ext {times['ext']:.2f} ms"


def _said(value) -> str:
    return "missing" if value is None else "ok"


TARGETS = [
    Target("fwd+bwd M=8192 4096->4096 r=16", 1.10, False, time_vs_base("large", "fwd_bwd")),
    Target("fwd+bwd M=2048 4096->4096 r=16", 1.25, False, time_vs_base("mid", "fwd_bwd")),
    Target("fwd+bwd M=8192 4096->11008 r=16", 1.08, False, time_vs_base("wide", "fwd_bwd")),
    Target("rank 8: capacity 128 / capacity 8", 1.05, False, pool_vs_dense),
    Target("forward M=1 (decode) r=16", 1.30, False, time_vs_base("decode", "fwd")),
    Target("saved for backward / peft", 1.00, False, saved_vs_peft),
    Target("ext reductions, 224 tensors: loop/ext", 5.0, True, ext_speedup),
    Target("pool AdamW step, 224 pools: foreach/ext", 2.0, True, adamw_speedup),
]
_FLOAT32_ONLY = (ext_speedup, adamw_speedup)  # the extension's rows: no fp16 column


def evaluate(lora_rows: list[dict], ext_rows: list[dict], dtype: str = "bfloat16") -> list[Verdict]:
    """One verdict per target: ``dtype`` decides, float16 is reported beside it."""
    out = []
    for target in TARGETS:
        value, note = target.measure(lora_rows, ext_rows, dtype)
        fp16 = None
        if dtype != "float16" and target.measure not in _FLOAT32_ONLY:
            fp16, _ = target.measure(lora_rows, ext_rows, "float16")
        out.append(Verdict(target, value, fp16, note))
    return out


def table(verdicts: list[Verdict]) -> list[str]:
    """Fixed-width lines: target, goal, measured, fp16, verdict, note."""
    def num(v):  # three decimals: 1.104 against a 1.10 limit must not read "1.10x ... MISS"
        return "-" if v is None else f"{v:.3f}x"

    width = max(len(v.target.name) for v in verdicts)
    lines = [f"{'target':<{width}}  {'goal':>8}  {'measured':>8}  {'fp16':>7}  verdict  note"]
    for v in verdicts:
        lines.append(f"{v.target.name:<{width}}  {v.target.goal:>8}  {num(v.value):>8}  {num(v.fp16):>7}  "
                     f"{v.word:<7}  {v.note}")
    return lines
