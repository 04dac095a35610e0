"""``pip install 'lorambo[transformers]'`` is the install for LoRAMBoCallback (README, Install), and
the callback runs inside transformers' Trainer, which refuses to start without accelerate
("Using the `Trainer` with `PyTorch` requires `accelerate>=1.1.0`"): the extra must bring it."""

from packaging.requirements import Requirement
from packaging.version import Version
from transformers.utils.import_utils import ACCELERATE_MIN_VERSION

from pyproject_data import pyproject


def test_the_transformers_extra_brings_the_accelerate_the_trainer_needs():
    extra = [Requirement(r) for r in pyproject()["project"]["optional-dependencies"]["transformers"]]
    accelerate = [r for r in extra if r.name == "accelerate"]
    assert len(accelerate) == 1, [str(r) for r in extra]
    floors = [Version(s.version) for s in accelerate[0].specifier if s.operator == ">="]
    # no older accelerate than transformers' Trainer accepts (pip could otherwise keep one installed)
    assert len(floors) == 1 and floors[0] >= Version(ACCELERATE_MIN_VERSION), str(accelerate[0])
