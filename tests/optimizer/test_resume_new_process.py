"""The resume property in a new process (``resume_loop.py`` run as a script): nothing the
in-process tests share between the runs (slot id counters, caches, torch's global state) is
needed to go on exactly as the uninterrupted run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorambo.allocation.report import read_decisions

import resume_loop
from resume_loop import STEPS

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parents[2]
# rank moves scored by AdaLoRA importance, decisions at steps 1, 3, 5; saved right before step 3
CFG = {"mode": "moves", "budget": 600, "initial_budget": 300, "sensitivity": "gradient", "seed": 1, "warmup": 1,
       "interval": 2, "stop_step": None, "max_rank": None, "optimizer": "lorambo", "accum": 2, "bf16": True,
       "dropout": 0.1, "importance": True, "head": True, "rebuild": "state_dict"}
SAVE_AT = 3


def test_resume_in_a_new_process_is_the_uninterrupted_run(tmp_path):
    batches = resume_loop.data(CFG)[0]
    ref = resume_loop.start(CFG, None)
    resume_loop.train(ref, CFG, range(STEPS), batches)
    assert {r["step"] for r in ref[1].decisions} >= {1, 3}

    ckpt = tmp_path / "ckpt"
    run = resume_loop.start(CFG, ckpt / "decisions.jsonl")
    resume_loop.train(run, CFG, range(SAVE_AT), batches)
    resume_loop.save(run, ckpt)
    (tmp_path / "cfg.json").write_text(json.dumps(CFG))
    paths = [str(ROOT), str(ROOT / "kernels"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, str(Path(resume_loop.__file__)), str(tmp_path / "cfg.json"), str(ckpt),
                    str(tmp_path / "out.pt"), str(SAVE_AT)], env=env, check=True, capture_output=True, text=True)

    got = torch.load(tmp_path / "out.pt", weights_only=True)
    resume_loop.assert_same(got, resume_loop.final_state(ref))
    assert read_decisions(ckpt / "decisions.jsonl") == ref[1].decisions
