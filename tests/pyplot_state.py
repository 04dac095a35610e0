"""Drawing lorambo's PNGs must leave the caller's pyplot as it was: its backend (a notebook's
inline display, a desktop window) and its open and current figures."""

import contextlib

import pytest


@contextlib.contextmanager
def pyplot_left_alone():
    """Run the block with pyplot on the "svg" backend holding one open, current figure; fail
    unless the block leaves exactly that: the backend, the figures and the current one."""
    plt = pytest.importorskip("matplotlib.pyplot")
    before = plt.get_backend()
    plt.switch_backend("svg")  # any backend but Agg, which the drawing used to switch to
    mine = plt.figure()
    try:
        yield
        assert plt.get_backend() == "svg", f"the backend was switched to {plt.get_backend()}"
        assert plt.get_fignums() == [mine.number] and plt.gcf() is mine
    finally:
        plt.close("all")
        plt.switch_backend(before)
