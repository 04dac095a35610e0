"""Progress bars of long passes: on stderr when asked for, nothing on stdout, same results."""

import re

import pytest
import torch
from torch import nn

from lorambo.sensitivity import hessian_trace


def _setup():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 2))
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(2)]
    return model, (lambda m, b: (m(b[0]) - b[1]).pow(2).mean()), batches


@pytest.mark.parametrize("method", ["hutch++", "xtrace"])
def test_sketch_methods_show_their_products_on_stderr(method, capsys):
    """progress=True showed no bar for hutch++ / xtrace (only Hutchinson's probe loop had one)."""
    model, loss_fn, batches = _setup()
    quiet = hessian_trace(model, loss_fn, batches, method=method, num_probes=6, progress=False)
    assert capsys.readouterr().err == ""
    shown = hessian_trace(model, loss_fn, batches, method=method, num_probes=6, probes_per_pass=4,
                          progress=True)
    out, err = capsys.readouterr()
    assert out == ""
    assert {n: (e.value, e.stderr) for n, e in shown.items()} == {n: (e.value, e.stderr) for n, e in quiet.items()}
    counts = re.findall(r"(\d+)/(\d+) \[", err.split("\r")[-1])
    assert f"hessian_trace ({method})" in err and counts, err
    done, total = map(int, counts[-1])
    assert done == total > 0  # the bar ends full: total is the number of products taken
