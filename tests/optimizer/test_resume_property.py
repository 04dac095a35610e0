"""A run saved at any step boundary and resumed into freshly built objects goes on as the run
that never stopped: the same decisions, ranks, parameters, optimizer and importance state, bit
for bit, over random schedules (online growth, rank moves, ALoRA, the closed-form allocation
alone), optimizers, gradient accumulation, bf16 autocast, float16 models and interruption
steps (before, at and after a decision, in the warmup, after the last decision). The loop:
``resume_loop.py``."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorambo.allocation.report import read_decisions

import resume_loop
from resume_loop import STEPS

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torch's AdamW / SGD under growth: the warning that lorambo.optim.AdamW would fit better
              pytest.mark.filterwarnings("ignore:AdamW keeps one step count per parameter"),
              pytest.mark.filterwarnings("ignore:negative Hessian trace estimates")]  # 2 probes: noisy


@st.composite
def configs(draw):
    mode = draw(st.sampled_from(["growth", "moves", "alora", "closed_form"]))
    # ALoRA at 900 starts with full pools: its rounds then move nothing
    budget = draw(st.sampled_from([400, 600] if mode == "alora" else [400, 600, 900]))
    optimizer = draw(st.sampled_from(["lorambo", "adamw", "sgd"]))
    # a float16 model under lorambo's AdamW (float32 moments) or SGD; torch's AdamW keeps float16
    # moments, whose second moment underflows to 0 and makes the run NaN
    float16 = optimizer != "adamw" and draw(st.booleans())
    return {"mode": mode, "budget": budget, "dtype": "float16" if float16 else "float32",
            "initial_budget": budget if mode == "alora" else draw(st.sampled_from([48, 200, 300])),  # 48: rank-0 layers
            "sensitivity": draw(st.sampled_from(["gradient", "hessian", "data"])),
            "seed": draw(st.integers(0, 3)), "warmup": draw(st.integers(0, 3)), "interval": draw(st.integers(1, 3)),
            "stop_step": draw(st.sampled_from([None, 4, 6])), "max_rank": draw(st.sampled_from([None, 4])),
            "optimizer": optimizer, "accum": draw(st.sampled_from([1, 2])),
            "bf16": not float16 and draw(st.booleans()), "dropout": draw(st.sampled_from([0.0, 0.1])),
            "importance": mode == "moves" and draw(st.booleans()), "head": draw(st.booleans()),
            "rebuild": draw(st.sampled_from(["adapter", "state_dict"]))}


def decision_steps(cfg):
    if cfg["mode"] == "closed_form":
        return []
    stop = STEPS if cfg["stop_step"] is None or cfg["mode"] == "alora" else min(cfg["stop_step"], STEPS)
    steps = range(cfg["warmup"], stop, cfg["interval"])
    return list(steps)[:2] if cfg["mode"] == "alora" else list(steps)


@st.composite
def interruptions(draw):
    """(cfg, k): the run is saved after step k - 1, before step k."""
    cfg = draw(configs())
    decisions = decision_steps(cfg)
    where = draw(st.sampled_from(["around a decision", "in the warmup", "after the last decision", "anywhere"]))
    if where == "around a decision" and decisions:
        k = draw(st.sampled_from(decisions)) + draw(st.sampled_from([-1, 0, 1]))
    elif where == "in the warmup" and cfg["warmup"] > 0:
        k = draw(st.integers(0, cfg["warmup"]))
    elif where == "after the last decision" and decisions:
        k = draw(st.integers(decisions[-1] + 1, STEPS))
    else:
        k = draw(st.integers(0, STEPS))
    return cfg, min(max(k, 0), STEPS)


@settings(max_examples=24, deadline=None, derandomize=True, database=None)
@given(interruptions())
def test_resume_at_any_step_is_the_uninterrupted_run(tmp_path_factory, case):
    cfg, k = case
    tmp = tmp_path_factory.mktemp("run")
    batches = resume_loop.data(cfg)[0]
    ref = resume_loop.start(cfg, tmp / "ref.jsonl")
    resume_loop.train(ref, cfg, range(STEPS), batches)

    log = tmp / "run.jsonl"
    run = resume_loop.start(cfg, log)
    resume_loop.train(run, cfg, range(k), batches)
    resume_loop.save(run, tmp / "ckpt")
    resume_loop.train(run, cfg, range(k, min(k + 2, STEPS)), batches)  # logged past the save, then lost
    del run
    resumed = resume_loop.resume(cfg, tmp / "ckpt", log)
    resume_loop.train(resumed, cfg, range(k, STEPS), batches)

    resume_loop.assert_same(resume_loop.final_state(resumed), resume_loop.final_state(ref))
    assert read_decisions(log) == ref[1].decisions
