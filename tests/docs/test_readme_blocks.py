"""Every Python block of the README runs as written, in order, in one namespace (later blocks
continue from earlier ones), on the real all-MiniLM-L6-v2. One-line blocks are call
signatures (``LoRAMBoLinear(base, rank=8, ...)``), not programs, and are only parsed."""

import ast
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^(<!-- readme: not run[^\n]*-->\n)?```python\n(.*?)^```", re.S | re.M)


def python_blocks(runnable_only=False):
    """The README's Python blocks. A block announced by ``<!-- readme: not run (why) -->`` is
    parsed but not run; the comment must say what runs it instead."""
    found = BLOCK.findall((ROOT / "README.md").read_text(encoding="utf-8"))
    return [code for marker, code in found if not (runnable_only and marker)]


def test_every_block_parses_and_the_quickstart_is_a_program():
    blocks = python_blocks()
    assert len(blocks) >= 3
    for code in blocks:
        ast.parse(code)
    assert "load_minilm()" in blocks[0] and "lorambo.allocate(" in blocks[0]


@pytest.mark.slow
def test_readme_blocks_run_on_real_minilm(tmp_path, monkeypatch, capsys):
    # The quickstart draws the rank heat map (save_heatmap, the 'plot' extra).
    pytest.importorskip("matplotlib", reason="the README quickstart calls save_heatmap, which needs matplotlib")
    import lorambo

    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(1)
    namespace = {"__name__": "readme"}
    programs = [code for code in python_blocks(runnable_only=True) if len(code.strip().splitlines()) > 1]
    quickstart_ranks = None
    for i, code in enumerate(programs):
        exec(compile(code, f"README.md python block {i}", "exec"), namespace)
        if i == 0:
            quickstart_ranks = dict(namespace["ranks"])
            assert not lorambo.lora_layers(namespace["model"])  # unloaded at the end
    from lorambo.experiments.minilm import load_minilm

    # the quickstart saved, exported and unloaded; its adapter loads back into a fresh MiniLM

    assert (tmp_path / "run" / "adapter.safetensors").is_file()
    assert {p.name for p in (tmp_path / "run" / "peft").iterdir()} == {"adapter_config.json",
                                                                      "adapter_model.safetensors"}
    fresh, _ = load_minilm()
    lorambo.load_adapter(fresh, tmp_path / "run" / "adapter.safetensors")
    ranks = quickstart_ranks
    assert {n: l.rank for n, l in lorambo.lora_layers(fresh).items()} == ranks
    assert sum(r * 768 for r in ranks.values()) <= 100_000
    # the LoRAMBoOptimizer block ran on the unloaded model and wrote its heat map
    assert (tmp_path / "run" / "ranks.png").stat().st_size > 1000
    opt = namespace["opt"]
    assert "pooler.dense" not in opt.names and len(opt.names) == 36
    assert "module" in capsys.readouterr().out  # the rank table was printed
