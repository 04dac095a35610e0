"""Helpers for tracing lorambo layers with torch.compile."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar, cast

import torch

_F = TypeVar("_F", bound=Callable[..., Any])


def run_eagerly(fn: _F) -> _F:
    """``torch.compiler.disable(fn)``, typed as ``fn`` (torch's annotation loses its signature,
    and with it the type checks of every call). For host-side code whose Python state (ranks,
    caches, gradient objects) would become guards of a compiled graph and recompile it at every
    change: called from compiled code, it runs eagerly behind a graph break."""
    return cast(_F, torch.compiler.disable(fn))


def rank_tensor(rank: int) -> torch.Tensor:
    """A new 0-d int64 CPU tensor holding ``rank``, for :func:`traced_rank`: a plain tensor even
    when made under ``torch.inference_mode()`` (so that later rank changes may write to it), on
    the CPU under any default device."""
    if not torch.is_inference_mode_enabled():  # entering the context costs twice the tensor
        return torch.full((), int(rank), dtype=torch.int64, device="cpu")
    with torch.inference_mode(False):
        return torch.full((), int(rank), dtype=torch.int64, device="cpu")


def outside_inference_mode():
    """A context in which new tensors are plain ones also under ``torch.inference_mode()``: a
    layer's pools and rank tensor are edited in place by every rank change, merge and load, which
    PyTorch refuses for inference tensors outside inference mode (and autograd refuses to save
    them), so a layer built in inference mode could only ever run in it. A no-op outside it."""
    if torch.is_inference_mode_enabled():
        return torch.inference_mode(False)
    return contextlib.nullcontext()


def traced_rank(layer: torch.nn.Module) -> int:
    """The active rank of ``layer`` as the LoRA op takes it: ``layer._rank`` outside
    torch.compile, else the value of ``layer._rank_tensor`` (a 0-d int64 CPU tensor from
    :func:`rank_tensor` that the layer keeps equal to its rank), read in the graph.

    Read with ``.item()`` under torch.compile, the rank is an unbacked SymInt: the graph reads
    it at every call, so it has no guard on the rank and one graph serves every rank, 0 and 1
    included. An int attribute (even one traced as a dynamic int) is a backed SymInt, and Dynamo
    specialises those on 0 and 1: the graph with a symbolic rank guarded ``rank >= 2`` per
    layer, and each new set of layers at rank 0 or 1 compiled a new graph until the recompile
    limit. ``layer._rank`` is not read under compile: torch 2.11's Dynamo guards on the value of
    an int attribute it reads even when unused. The ops slice the pools at the value they are
    called with, so a compiled graph's cost follows the rank as the eager op's does. The checks
    bound the value for the ops' shape checks (a tensor outside them fails at run time, never
    silently). Reading a CPU scalar is no device synchronisation. Under ``fullgraph=False`` the
    read needs :func:`_let_the_graph_hold_scalars` as well.
    """
    if not torch.compiler.is_compiling():
        return layer._rank
    _let_the_graph_hold_scalars()
    patch = getattr(torch._dynamo, "patch_dynamo_config", None)  # fullgraph=True captures .item() anyway
    with patch(capture_scalar_outputs=True) if patch is not None else contextlib.nullcontext():
        value = layer._rank_tensor.item()
    torch._check(value >= 0)
    torch._check(value <= layer.capacity)
    return value


@torch.compiler.assume_constant_result
def _let_the_graph_hold_scalars() -> bool:
    """Let the graph being compiled hold the ``.item()`` of :func:`traced_rank`, as
    ``fullgraph=True`` does; Dynamo runs it once while tracing (a constant of the graph).

    ``patch_dynamo_config(capture_scalar_outputs=True)`` lets Dynamo trace the read, but the
    frame's shape environment takes torch.compile's own setting, which only ``fullgraph=True``
    turns on. Under the default ``fullgraph=False`` the backend (AOTAutograd: ``inductor``,
    ``aot_eager``) would refuse the read: Dynamo then breaks the graph at every layer with a
    "Backend compiler exception" warning and the rank reaches the op as a Python int, which it
    specialises (a recompile for rank 0 and for rank 1 per frame, and eager code past the
    recompile limit). The shape environment belongs to this one compile; nothing outlives it.
    Within it, the fake implementations of other data-dependent scalar reads in the same frame
    then also give unbacked values, as under ``fullgraph=True`` (Dynamo still breaks the graph
    at a user's own ``.item()`` unless ``capture_scalar_outputs`` is set).
    """
    context = torch._guards.TracingContext.try_get()
    shape_env = getattr(getattr(context, "fake_mode", None), "shape_env", None)
    settings = getattr(shape_env, "settings", None)
    if dataclasses.is_dataclass(settings) and getattr(settings, "allow_scalar_outputs", True) is False:
        shape_env.settings = dataclasses.replace(settings, allow_scalar_outputs=True)
    return True


@torch.compiler.assume_constant_result
def autocast_available(device_type: str) -> bool:
    """``torch.amp.is_autocast_available(device_type)``, constant under torch.compile.

    torch 2.11's Dynamo cannot trace ``torch._C._is_autocast_available`` (torch 2.13's can): a
    fullgraph compile of a LoRAMBoLinear failed with ``Unsupported``. The answer depends only on
    the device type, so Dynamo evaluates it once while tracing and keeps the result as a constant.
    """
    return torch.amp.is_autocast_available(device_type)
