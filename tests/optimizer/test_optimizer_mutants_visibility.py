"""LoRAMBoOptimizer's views of the configured model: current ranks, the rank table and the heat
map (found by mutation testing of lorambo/optimizer.py)."""

import pytest
import torch

import lorambo
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet

pytestmark = pytest.mark.usefixtures("one_thread")


def _configured():
    torch.manual_seed(0)
    model = ResidualNet(width=8, hidden=12)
    opt = LoRAMBoOptimizer(model, 300, sensitivity_method="frobenius")
    opt.compute_optimal_ranks()
    opt.configure()
    return model, opt


def test_save_heatmap_returns_the_path_of_the_png_it_wrote(tmp_path):
    pytest.importorskip("matplotlib", reason="save_heatmap's optional dependency")
    _, opt = _configured()
    path = opt.save_heatmap(tmp_path / "ranks.png")
    assert path == tmp_path / "ranks.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_current_ranks_and_the_rank_table_show_the_model_as_it_is_now():
    model, opt = _configured()
    layers = lorambo.lora_layers(model)
    layers["blocks.1.up"].set_rank(layers["blocks.1.up"].rank + 1)  # as a decision would
    assert opt.current_ranks() == {n: m.rank for n, m in layers.items()}
    assert opt.current_ranks() != opt.ranks
    table = opt.rank_table()
    for n, m in layers.items():
        row = next(line for line in table.splitlines() if line.split()[:1] == [n])
        assert row.split()[1:3] == [str(m.rank), str(m.capacity)]
