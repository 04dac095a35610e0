"""The ways a user copies a whole model (an EMA or teacher by deepcopy, a checkpoint by pickle or
torch.save), as ``COPIERS`` / ``COPIER_IDS`` for ``pytest.mark.parametrize("copier", ...)``."""

import copy
import io
import pickle

import torch


def pickle_copy(model):
    return pickle.loads(pickle.dumps(model))


def torch_save_copy(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


COPIERS = [copy.deepcopy, pickle_copy, torch_save_copy]
COPIER_IDS = ["deepcopy", "pickle", "torch.save"]
