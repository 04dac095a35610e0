"""Imports in lorambo point one way: down the floors of docs/architecture.md, with no cycles.

The checks themselves (tests/import_direction_check.py) are tested on planted graphs first, so a
passing run of the real one means the tree is clean, not that the checker sees nothing.
"""

import textwrap

from import_direction_check import (
    FLOORS,
    Edge,
    edges_of,
    floor_violations,
    import_graph,
    module_cycles,
    same_floor_cycles,
    unit_of,
)

GRAPH = import_graph()


def _fail_message(problems: list[str]) -> str:
    return f"{len(problems)} import(s) against docs/architecture.md:\n" + "\n".join(problems)


# ---------------------------------------------------------------------------- the real tree
def test_the_graph_covers_the_whole_tree():
    units = {unit_of(e.source) for e in GRAPH} | {unit_of(e.target) for e in GRAPH}
    assert {"distributed", "ext", "kernels", "ops", "nn", "optim", "model", "adapters", "sensitivity",
            "allocation", "optimizer", "integrations", "experiments", "cli", "__init__"} <= units
    lazy = {(e.source, e.target) for e in GRAPH if not e.top_level}
    assert ("lorambo.ops.backend", "lorambo.ext.loader") in lazy  # a function-level import


def test_imports_point_down_the_floors():
    problems = floor_violations(GRAPH)
    assert not problems, _fail_message(problems)


def test_units_of_one_floor_do_not_import_each_other_in_a_ring():
    problems = same_floor_cycles(GRAPH)
    assert not problems, _fail_message(problems)


def test_no_module_cycle_at_import_time():
    problems = module_cycles(GRAPH)
    assert not problems, _fail_message(problems)


def test_the_bottom_floor_imports_nothing_from_lorambo_above_it():
    """Floor 0 units import only themselves and user_warnings, a leaf that imports nothing of lorambo."""
    for e in GRAPH:
        if unit_of(e.source) == "user_warnings":
            assert unit_of(e.target) == "user_warnings", f"{e}: user_warnings imports nothing of lorambo"
        elif FLOORS.get(unit_of(e.source)) == 0:
            assert unit_of(e.target) in (unit_of(e.source), "user_warnings"), \
                f"{e}: floor 0 imports only itself and user_warnings"


# ------------------------------------------------------------------------ the checker itself
def _edge(source, target, top_level=True, line=1):
    return Edge(source, target, source.replace(".", "/") + ".py", line, top_level)


def test_checker_reports_an_upward_import_with_its_file_and_line():
    edges = [_edge("lorambo.ops.dispatch", "lorambo.ops.backend"),
             _edge("lorambo.nn.slots", "lorambo.allocation.online", top_level=False, line=42),
             _edge("lorambo.sensitivity.fisher", "lorambo", line=7)]
    problems = floor_violations(edges)
    assert len(problems) == 2
    assert problems[0].startswith("lorambo/nn/slots.py:42 imports lorambo.allocation.online")
    assert "nn (floor 2) must not import allocation (floor 5)" in problems[0]
    assert "sensitivity (floor 4) must not import __init__ (floor 8)" in problems[1]
    assert "unit 'newthing' has no floor" in floor_violations([_edge("lorambo.newthing", "lorambo.ops")])[0]


def test_checker_reports_a_module_cycle_but_not_a_lazy_one():
    ring = [_edge("lorambo.ops.a", "lorambo.ops.b", line=3), _edge("lorambo.ops.b", "lorambo.ops.c"),
            _edge("lorambo.ops.c", "lorambo.ops.a", line=9)]
    (problem,) = module_cycles(ring)
    assert "lorambo.ops.a <-> lorambo.ops.b <-> lorambo.ops.c" in problem
    assert "lorambo/ops/a.py:3 imports lorambo.ops.b" in problem and "lorambo/ops/c.py:9 imports lorambo.ops.a" in problem
    lazy_back = ring[:2] + [_edge("lorambo.ops.c", "lorambo.ops.a", top_level=False)]
    assert module_cycles(lazy_back) == []


def test_checker_reports_a_ring_of_units_on_one_floor():
    edges = [_edge("lorambo.optimizer", "lorambo.integrations.fsdp"),
             _edge("lorambo.integrations.trainer", "lorambo.optimizer", top_level=False)]
    (problem,) = same_floor_cycles(edges)
    assert "floor 6 unit cycle integrations <-> optimizer" in problem
    assert same_floor_cycles(edges[:1]) == []  # one way is allowed


def test_parser_sees_lazy_and_relative_imports_and_skips_type_checking():
    source = textwrap.dedent("""
        from typing import TYPE_CHECKING
        import torch
        from . import reductions
        from .fisher import FisherProxy
        from lorambo import LoRAMBoLinear, optim
        if TYPE_CHECKING:
            from lorambo.allocation import allocate
        else:
            import lorambo.ops.dispatch

        def late():
            import lorambo.nn.slots as slots
    """)
    known = {"lorambo", "lorambo.optim", "lorambo.ops", "lorambo.ops.dispatch", "lorambo.nn", "lorambo.nn.slots",
             "lorambo.allocation", "lorambo.sensitivity", "lorambo.sensitivity.fisher",
             "lorambo.sensitivity.reductions", "lorambo.sensitivity.simple"}
    edges = edges_of("lorambo.sensitivity.simple", source, "lorambo/sensitivity/simple.py", known)
    got = {(e.target, e.line, e.top_level) for e in edges}
    assert got == {("lorambo.sensitivity.reductions", 4, True), ("lorambo.sensitivity.fisher", 5, True),
                   ("lorambo", 6, True), ("lorambo.optim", 6, True), ("lorambo.ops.dispatch", 10, True),
                   ("lorambo.nn.slots", 13, False)}
