"""A model copied (deepcopy, pickle) between begin_step and step: the capture hook's closure did
not pickle, and a deep copy shared it, so the copy's forward (an EMA or teacher model) was
recorded into the decision. Copies now carry a hook that records nothing."""

import copy
import pickle

import pytest
import torch

from test_plain_loop_resume import DATA, _start, mse  # tests/optimizer/test_plain_loop_resume.py

pytestmark = pytest.mark.usefixtures("one_thread")


def _decide(copier):
    model, opt, _ = _start(None)
    with opt.capture(2):
        if copier is not None:  # the copy computes what the model does, and is not captured
            loss = mse(copier(model), DATA[5])
            loss.backward()
            with torch.no_grad():  # not recorded either way
                assert torch.equal(loss.detach(), mse(model, DATA[5]))
        mse(model, DATA[2]).backward()
    return model, opt.step(2)


@pytest.mark.parametrize("copier", [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
                         ids=["deepcopy", "pickle"])
def test_copies_taken_while_armed_work_and_do_not_feed_the_decision(copier):
    ref_model, ref_records = _decide(None)
    model, records = _decide(copier)
    assert records == ref_records and records
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
