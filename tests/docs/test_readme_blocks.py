"""Every Python block of the README and of the reference pages whose examples continue from its
quickstart runs as written, in one namespace, in a fixed order (``RUN_ORDER``: the README's blocks,
then each page's; later blocks continue from earlier ones), on the real all-MiniLM-L6-v2. One-line
blocks are call signatures (``LoRAMBoLinear(base, rank=8, ...)``), not programs, and are only
parsed; every docs/*.md page's blocks parse, and a page with a program must be in ``RUN_ORDER``."""

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
BLOCK = re.compile(r"^(<!-- readme: not run[^\n]*-->\n)?```python\n(.*?)^```", re.S | re.M)
# The pages whose blocks run, in this order, in one namespace: the README (its quickstart first),
# then the pages whose examples continue from it (each says so, naming this order).
RUN_ORDER = ("README.md", "docs/allocation.md", "docs/interop.md")
PAGES = ("README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md")))
# The user's reference: the README and the pages its API overview links to for the details (the
# other docs/ pages are the architecture, the measurements and the GPU procedures).
REFERENCE = ("README.md", "docs/model.md", "docs/adamw.md", "docs/allocation.md", "docs/sensitivities.md",
             "docs/backends.md", "docs/interop.md", "docs/guarantees.md", "docs/demo.md")


def page_blocks(page: str, runnable_only=False) -> list[str]:
    """A page's Python blocks. A block announced by ``<!-- readme: not run (why) -->`` is parsed
    but not run; the comment must say what runs it instead."""
    found = BLOCK.findall((ROOT / page).read_text(encoding="utf-8"))
    return [code for marker, code in found if not (runnable_only and marker)]


def is_program(code: str) -> bool:
    return len(code.strip().splitlines()) > 1


def python_blocks(runnable_only=False):
    """The blocks of ``RUN_ORDER``'s pages, in the order they run."""
    return [code for page in RUN_ORDER for code in page_blocks(page, runnable_only)]


def test_every_page_with_a_program_is_run_in_order():
    assert all(page in PAGES for page in RUN_ORDER)
    for page in PAGES:
        if any(is_program(code) for code in page_blocks(page, runnable_only=True)):
            assert page in RUN_ORDER, f"{page} has a Python program that no test runs"
    for page in RUN_ORDER[1:]:
        text = re.sub(r"\s+", " ", (ROOT / page).read_text(encoding="utf-8"))
        assert "continue from the README's [quickstart](../README.md#quickstart)" in text, page
        order = ", ".join(f"[{Path(p).name}]({Path(p).name})" for p in RUN_ORDER[1:])
        assert f"in this order: the README, {order}" in text, page


def test_every_block_of_every_page_parses():
    for page in PAGES:
        for i, code in enumerate(page_blocks(page)):
            ast.parse(code, f"{page} python block {i}")


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
    programs = [(page, code) for page in RUN_ORDER for code in page_blocks(page, runnable_only=True)
                if is_program(code)]
    assert {page for page, _ in programs} == set(RUN_ORDER)  # every page in the order runs something
    quickstart_ranks = None
    for i, (page, code) in enumerate(programs):
        block = f"{page} python block {i}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(compile(code, block, "exec"), namespace)
        # lorambo reports its warnings at the user's line: a block copied as written must not
        # earn one (a rank change that leaves the optimizer's state behind, say)
        assert [f"{w.lineno}: {w.message}" for w in caught if w.filename == block] == [], block
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
