"""The extension's fakes are registered whatever imported ``lorambo.ext.fake`` first: imported
before ``lorambo._C`` (a tool walking lorambo's modules, an early ``from lorambo.ext import
fake``) it registered nothing, the loader's import of it was then a no-op, and every meta /
FakeTensor / torch.compile call of a ``torch.ops.lorambo`` op failed with "could not find the
fake impl"."""

import os
import subprocess
import sys

from ext_testutil import needs_ext

pytestmark = needs_ext

SCRIPT = """
import torch
import lorambo.ext.fake  # before the extension
from lorambo.ext import loader
assert loader.load() is not None
x = torch.randn(3, 4, generator=torch.Generator().manual_seed(0)).to("meta")
print(tuple(torch.ops.lorambo.dropout_mask(x, 0.5, 3).shape))
try:
    torch.ops.lorambo.dropout_mask(x, 1.0, 3)
except RuntimeError as err:
    print(err)
"""


def test_fakes_are_registered_when_the_fake_module_was_imported_before_the_extension():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["(3, 4)", "lorambo::dropout_mask: dropout_p must be in [0, 1), got 1"]
