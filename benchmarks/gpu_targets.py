"""The speed targets of docs/gpu_check.md, judged from the benchmark CSVs of one run.

Every ratio is lorambo over a comparison measured in the same run and dtype (bf16 decides the
verdict; fp16 is shown beside it when measured). A CSV holding several runs (a rerun appends) is
judged on the device of its latest run, each target on the latest run holding its rows. A target
with no measurement (a row missing, an empty, NaN, infinite or zero time, rows of another size)
is a MISS that says what was not measured: the verdict never reads a missing number as a pass.

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


def _number(row: dict, column: str) -> float | None:
    """The cell as a finite number, None when it is empty, unreadable, NaN or infinite: a cell
    the benchmark could not fill is no measurement."""
    try:
        value = float(row.get(column) or "")
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _ms_cell(row: dict) -> float | None:
    """``ms_median`` as a time: finite and > 0 (a 0 or negative time measured nothing)."""
    value = _number(row, "ms_median")
    return value if value is not None and value > 0 else None


def latest_run(rows: list[dict], keep: Callable[[dict], bool]) -> tuple[str, list[dict]]:
    """(run id, the rows ``keep`` accepts of the latest run holding any): one run is compared
    with itself, never with another run's rows (a rerun appends; run ids are UTC timestamps)."""
    rows = [r for r in rows if keep(r)]
    if not rows:
        return "", []
    last = max(r.get("run") or "" for r in rows)
    return last, [r for r in rows if (r.get("run") or "") == last]


def _one(rows: list[dict], what: str, **match) -> tuple[dict | None, str]:
    """(the one row matching ``match``, ""), else (None, why): missing, or several in one run."""
    hits = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    if len(hits) == 1:
        return hits[0], ""
    return None, f"{what} {'missing' if not hits else f'in {len(hits)} rows'}"


def _time(rows, what, **match) -> tuple[float | None, str]:
    row, why = _one(rows, what, **match)
    if row is None:
        return None, why
    value = _ms_cell(row)
    return (value, "") if value is not None else (None, f"{what} ms_median {row.get('ms_median')!r}")


def _not_measured(*whys: str) -> str:
    return "not measured (" + ", ".join(w for w in whys if w) + ")"


def time_vs_base(case: str, mode: str):
    def measure(lora, ext, dtype):
        run, rows = latest_run(lora, lambda r: r.get("dtype") == dtype and r.get("case") == case)
        ours, why_ours = _time(rows, f"{case} lorambo", provider="lorambo", mode=mode)
        shape = (rows[0].get("M"), rows[0].get("K"), rows[0].get("N")) if rows else None
        # the frozen layer is measured once per shape per run, under the first case with it
        same_run = [r for r in lora if (r.get("run") or "") == run and r.get("dtype") == dtype]
        base, why_base = (_time(same_run, "frozen layer", provider="base", mode=mode, M=shape[0], K=shape[1],
                                N=shape[2]) if shape else (None, "frozen layer missing"))
        if ours is None or base is None:
            return None, _not_measured(f"no {dtype} {case} rows" if not rows else "", why_ours, why_base)
        return ours / base, f"{ours:.3f} / {base:.3f} ms"
    return measure


def pool_vs_dense(lora, ext, dtype):
    _, rows = latest_run(lora, lambda r: r.get("dtype") == dtype and r.get("case") in ("pool", "pool_dense"))
    pool, why_pool = _time(rows, "capacity-128", case="pool", provider="lorambo", mode="fwd_bwd")
    dense, why_dense = _time(rows, "capacity-8", case="pool_dense", provider="lorambo", mode="fwd_bwd")
    if pool is None or dense is None:
        return None, _not_measured(why_pool, why_dense)
    return pool / dense, f"{pool:.3f} / {dense:.3f} ms"


def saved_vs_peft(lora, ext, dtype):
    """Bytes saved for backward at the ``large`` case, lorambo over peft (peft-style when the
    library was not measured), from one run."""
    _, rows = latest_run(lora, lambda r: r.get("dtype") == dtype and r.get("case") == "large"
                         and r.get("mode") == "fwd_bwd")

    def saved(provider):
        row, why = _one(rows, provider, provider=provider)
        value = None if row is None else _number(row, "saved_bytes")
        if value is not None and value >= 0 and value == int(value):  # -1: not measured
            return int(value), ""
        return None, why or f"{provider} saved_bytes {row.get('saved_bytes')!r}"

    ours, why_ours = saved("lorambo")
    peft, why_peft = saved("peft")
    name, theirs = ("peft", peft) if peft is not None else ("peft_style", saved("peft_style")[0])
    if ours is None or theirs is None:
        return None, _not_measured(why_ours, why_peft if theirs is None else "")
    if theirs == 0:
        return (1.0 if ours == 0 else math.inf), f"{ours} B vs {name} 0 B"
    if theirs < 10 * 1024:
        return ours / theirs, f"{ours} / {theirs} B vs {name}"
    return ours / theirs, f"{ours / 1024:.0f} / {theirs / 1024:.0f} KiB vs {name}"


# bench_ext.py's reductions at full size: 32 layers of the 7B shapes (q, k, v, o, gate, up, down)
# at rank 16, rank x (out + in) each; its --quick run has the same 224 tensors at 1/8 the width
REDUCE_TENSORS = 224
REDUCE_ELEMENTS = 32 * 16 * (4 * (4096 + 4096) + 3 * (11008 + 4096))
REDUCE_CASES = [(case, dtype) for case in ("dot_224", "sq_norm_224") for dtype in ("float32", "bfloat16")]
ADAMW_CASE, ADAMW_WIDTH = "adamw_step_224", "1024"  # 224 pools [32, 1024]: bench_ext.py without --quick


def ext_speedup(lora, ext, dtype):
    """The smallest python_loop / ext time over the four full-size 224-tensor reductions (dot and
    squared norm, float32 and bfloat16) of one run; any of the four missing is no measurement."""
    def full_size(r):
        return (r.get("section") == "reduce" and r.get("M") == str(REDUCE_TENSORS)
                and r.get("K") == str(REDUCE_ELEMENTS))

    _, rows = latest_run(ext, full_size)
    if not rows:
        return None, _not_measured(f"no reduction rows over {REDUCE_TENSORS} tensors of {REDUCE_ELEMENTS} "
                                   "elements (bench_ext.py without --quick)")
    ratios, whys = [], []
    for case, dt in REDUCE_CASES:
        loop, why_loop = _time(rows, f"{case} {dt} python_loop", case=case, dtype=dt, provider="python_loop")
        ours, why_ours = _time(rows, f"{case} {dt} ext", case=case, dtype=dt, provider="ext")
        if loop is None or ours is None:
            whys += [why_loop, why_ours]
        else:
            ratios.append((loop / ours, f"{case} {dt}"))
    if whys:
        return None, _not_measured(*whys)
    worst = min(ratios)
    return worst[0], f"worst of {len(ratios)}: {worst[1]}"


def adamw_speedup(lora, ext, dtype):
    """foreach / ext time of one lorambo.optim.AdamW step over 224 pools 1024 wide (bench_ext
    section adamw, without --quick), from one run: whether the extension's CUDA pool update
    earns its place in ``auto``."""
    _, rows = latest_run(ext, lambda r: r.get("section") == "adamw" and r.get("case") == ADAMW_CASE
                         and r.get("K") == ADAMW_WIDTH)
    if not rows:
        return None, _not_measured(f"no {ADAMW_CASE} rows {ADAMW_WIDTH} wide")
    foreach, why_foreach = _time(rows, "foreach", provider="foreach")
    ours, why_ours = _time(rows, "ext", provider="ext")
    if foreach is None or ours is None:
        return None, _not_measured(why_foreach, why_ours)
    return foreach / ours, f"foreach {foreach:.2f} ms / ext {ours:.2f} ms"


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


def on_latest_device(rows: list[dict], keep: Callable[[dict], bool] = lambda r: True) -> list[dict]:
    """The rows measured on the device of the latest run ``keep`` accepts (all rows when none):
    a CSV that also holds another GPU's runs is judged on one GPU."""
    _, latest = latest_run(rows, keep)
    if not latest:
        return rows
    device = latest[0].get("device")
    return [r for r in rows if r.get("device") == device]


def evaluate(lora_rows: list[dict], ext_rows: list[dict], dtype: str = "bfloat16") -> list[Verdict]:
    """One verdict per target: ``dtype`` decides, float16 is reported beside it (measured on the
    same device). Each target reads one run: the latest holding its rows."""
    lora_rows = on_latest_device(lora_rows, lambda r: r.get("dtype") == dtype)
    ext_rows = on_latest_device(ext_rows)
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
