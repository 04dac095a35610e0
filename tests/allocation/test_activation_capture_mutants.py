"""What ActivationCapture records, checked on a plain float64 Linear against hand-computed rows
(found by mutation testing of lorambo/allocation/online.py): max_tokens' accepted values, the
evenly spaced rows it keeps and the T / m scale of their dY (float16 dY kept in float32), rows
picked among the real tokens of a mask, 2-D inputs kept whole, arming twice, disarming dropping the mask, clear,
calls without grad, retained-graph backward passes summed, has_data / missing_data's advice,
and compile_hint only when torch.compile skips the hook guards."""

import sys
import types

import numpy as np
import pytest
import torch

from lorambo.allocation.online import ActivationCapture, compile_hint, nothing_captured

DT = torch.float64


def _layer(seed=0, dtype=DT):
    torch.manual_seed(seed)
    return torch.nn.Linear(3, 2, dtype=dtype)


@pytest.mark.parametrize("bad", [True, 0, -1, 2.0, "3"])
def test_max_tokens_must_be_a_positive_int(bad):
    with pytest.raises(ValueError, match=r"max_tokens=.* must be an int >= 1 or None"):
        ActivationCapture({"l": _layer()}, max_tokens=bad)


def test_max_tokens_accepts_numpy_ints_and_none():
    capture = ActivationCapture({"l": _layer()}, max_tokens=np.int64(2))
    assert capture.max_tokens == 2 and type(capture.max_tokens) is int
    assert ActivationCapture({"l": _layer()}, max_tokens=1).max_tokens == 1
    assert ActivationCapture({"l": _layer()}).max_tokens is None


def _capture_one(max_tokens, x, w, mask=None, dtype=DT):
    layer = _layer(dtype=dtype)
    capture = ActivationCapture({"l": layer}, max_tokens=max_tokens)
    with capture:
        capture.set_token_mask(mask)
        (layer(x) * w).sum().backward()  # dY = w
    ((got_x, got_dy),) = capture.pairs("l")
    return got_x, got_dy


@pytest.mark.parametrize("m, rows", [(2, [0, 6]), (3, [0, 3, 6]), (4, [0, 2, 4, 6]), (1, [0]), (7, list(range(7))),
                                     (9, list(range(7)))])
def test_max_tokens_keeps_evenly_spaced_rows_with_scaled_dy(m, rows):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(1, 7, 3, generator=g, dtype=DT), torch.randn(1, 7, 2, generator=g, dtype=DT)
    got_x, got_dy = _capture_one(m, x, w)
    scale = 7 / m if m < 7 else 1.0  # rows floor(i * 6 / (m - 1)); dY times T / m
    torch.testing.assert_close(got_x, x[0, rows], rtol=0, atol=0)
    torch.testing.assert_close(got_dy, w[0, rows] * scale, rtol=1e-15, atol=0)


def test_max_tokens_picks_among_the_real_tokens_of_the_mask():
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(2, 4, 3, generator=g, dtype=DT), torch.randn(2, 4, 2, generator=g, dtype=DT)
    mask = torch.tensor([[1, 1, 0, 0], [0, 1, 1, 1]], dtype=torch.bool)
    got_x, got_dy = _capture_one(3, x, w, mask)
    real = [0, 1, 5, 6, 7]  # flat rows of the real tokens; picks 0, 2, 4 of them
    picked = [real[0], real[2], real[4]]
    torch.testing.assert_close(got_x, x.reshape(-1, 3)[picked], rtol=0, atol=0)
    torch.testing.assert_close(got_dy, w.reshape(-1, 2)[picked] * (5 / 3), rtol=1e-15, atol=0)
    # a mask with as many real tokens as max_tokens keeps them all, unscaled
    got_x, got_dy = _capture_one(5, x, w, mask)
    torch.testing.assert_close(got_dy, w.reshape(-1, 2)[real], rtol=0, atol=0)


def test_scaled_float16_dy_is_kept_in_float32_and_unscaled_stays_float16():
    x = torch.ones(1, 4, 3, dtype=torch.float16)
    w = torch.full((1, 4, 2), 60000.0, dtype=torch.float16)  # near float16's max, as a GradScaler's dY
    _, got_dy = _capture_one(2, x, w, dtype=torch.float16)
    assert got_dy.dtype == torch.float32
    torch.testing.assert_close(got_dy, torch.full((2, 2), 120000.0), rtol=0, atol=0)
    _, got_dy = _capture_one(4, x, w, dtype=torch.float16)
    assert got_dy.dtype == torch.float16
    _, got_dy = _capture_one(4, x, w, torch.ones(1, 4, dtype=torch.bool), dtype=torch.float16)  # mask, no pick
    assert got_dy.dtype == torch.float16


def test_a_mask_keeps_two_dim_inputs_whole():
    # [B, in] holds one row per example (a pooler): the [B, T] mask picks none of its rows
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(2, 3, generator=g, dtype=DT), torch.randn(2, 2, generator=g, dtype=DT)
    got_x, got_dy = _capture_one(None, x, w, torch.tensor([[False, True, True], [True, False, False]]))
    torch.testing.assert_close(got_x, x, rtol=0, atol=0)
    torch.testing.assert_close(got_dy, w, rtol=0, atol=0)


def test_arming_twice_records_each_call_once_and_disarm_drops_the_mask():
    layer = _layer()
    capture = ActivationCapture({"l": layer})
    assert not capture.armed
    capture.arm()
    capture.arm()
    assert capture.armed
    capture.set_token_mask(torch.tensor([[True, False]]))
    x = torch.randn(1, 2, 3, dtype=DT)
    layer(x).sum().backward()
    capture.disarm()
    assert not capture.armed
    layer(x).sum().backward()  # disarmed: not recorded
    assert len(capture.inputs["l"]) == 1 and len(capture.pairs("l")) == 1
    with capture as entered:  # a new capture keeps every row: the last batch's mask is gone
        assert entered is capture and capture.armed
        layer(torch.randn(3, 5, 3, dtype=DT)).sum().backward()
    assert not capture.armed
    assert [x.shape[0] for x, _ in capture.pairs("l")] == [1, 15]
    capture.clear()
    assert capture.inputs["l"] == [] and capture.grads["l"] == {} and not capture.has_data()


def test_calls_without_grad_are_not_recorded():
    layer = _layer()
    capture = ActivationCapture({"l": layer})
    x = torch.randn(2, 3, dtype=DT)
    with capture:
        with torch.no_grad():
            layer(x)
        layer.requires_grad_(False)
        layer(x)
    assert capture.inputs["l"] == []
    assert capture.missing_data() == nothing_captured()


def test_retained_graph_passes_sum_and_each_call_is_a_pair():
    layer = _layer()
    capture = ActivationCapture({"l": layer})
    x1, x2 = torch.randn(2, 3, dtype=DT), torch.randn(4, 3, dtype=DT)
    w = torch.randn(2, 2, dtype=DT)
    with capture:
        y1, y2 = layer(x1), layer(x2)
        (y1 * w).sum().backward(retain_graph=True)
        (3 * y1 * w).sum().backward()
        y2.sum().backward()
    (a, da), (b, db) = capture.pairs("l")
    torch.testing.assert_close(a, x1, rtol=0, atol=0)
    torch.testing.assert_close(da, 4 * w, rtol=1e-15, atol=0)
    torch.testing.assert_close(b, x2, rtol=0, atol=0)
    torch.testing.assert_close(db, torch.ones(4, 2, dtype=DT), rtol=0, atol=0)


def test_missing_data_tells_what_was_forgotten():
    layers = {"a": _layer(0), "b": _layer(1)}
    capture = ActivationCapture(layers)
    assert not capture.has_data()
    assert capture.missing_data() == nothing_captured()
    with capture:
        layers["b"](torch.randn(2, 3, dtype=DT))  # a forward, no backward
    assert not capture.has_data()
    assert "no gradient reached the layers" in capture.missing_data()
    assert "inside opt.capture(step), after the forward" in capture.missing_data()
    assert "inside opt.capture(7), after the forward" in capture.missing_data(7)
    with capture:
        layers["b"](torch.randn(2, 3, dtype=DT)).sum().backward()
    assert capture.has_data() and capture.pairs("a") == [] and len(capture.pairs("b")) == 1


def test_compile_hint_only_when_compiled_code_skips_the_hook_guards(monkeypatch):
    # a stand-in for torch._dynamo: setting the real config here leaves later compiled tests broken
    dynamo = types.SimpleNamespace(config=types.SimpleNamespace(skip_nnmodule_hook_guards=True))
    monkeypatch.setitem(sys.modules, "torch._dynamo", dynamo)
    hint = compile_hint()
    assert "set torch._dynamo.config.skip_nnmodule_hook_guards = False before compiling" in hint
    assert nothing_captured().endswith(hint)
    assert nothing_captured().startswith("no activations were captured: run its forward and backward")
    dynamo.config.skip_nnmodule_hook_guards = False
    assert compile_hint() == ""
    assert nothing_captured().endswith("after opt.begin_step(step)")
    dynamo.config.skip_nnmodule_hook_guards = True
    monkeypatch.delitem(sys.modules, "torch._dynamo")  # torch.compile never ran: no hint
    assert compile_hint() == ""
