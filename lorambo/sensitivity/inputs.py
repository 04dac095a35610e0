"""Checking what users pass in: the batch list and the loss_fn(model, batch) -> scalar convention."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch.utils.data import DataLoader

from lorambo.distributed import world_size

__all__ = ["Batches", "LossFn", "as_batch_list", "check_some_batches", "compute_loss", "scalar_loss",
           "check_finite_loss", "check_positive", "check_seed", "no_gradient_error", "NonFiniteProducts",
           "non_finite_loss_message"]

# For type checkers: ``batches`` is any iterable of whatever ``loss_fn(model, batch)`` takes
# (read once, into a list); ``loss_fn`` returns a scalar tensor or a Hugging Face ModelOutput
# with a loss (see as_batch_list and scalar_loss).
Batches = Iterable[Any]
LossFn = Callable[[Any, Any], torch.Tensor | Mapping[str, Any]]


def as_batch_list(batches, who: str) -> list:
    """Materialise ``batches`` as a list: estimators visit every batch once per pass. ``who``: the
    public function named in the errors.

    Empty is a ValueError, except under a process group of two or more processes: there a process
    without batches adds nothing to the sums and counts the estimators reduce over processes (so
    the union of the batches is weighted as in one process), and the estimators raise on every
    process when no process has any (:func:`check_some_batches`).

    A ``DataLoader`` is read without moving torch's global CPU generator: each pass over one
    draws a seed from it (its workers' base seed, and a shuffling sampler's), which would shift
    the training run's dropout masks and data order after every measurement and rank decision."""
    if isinstance(batches, (torch.Tensor, Mapping, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{who}: batches must be an iterable of batches (e.g. a list), got "
                        f"{type(batches).__name__}; wrap a single batch as [batch]")
    if isinstance(batches, DataLoader):
        with torch.random.fork_rng(devices=[]):
            batches = list(batches)
    else:  # a user's generator may draw its batches from the global generator on purpose
        batches = list(batches)
    if not batches and world_size() <= 1:
        raise ValueError(f"{who}: no batches: `batches` is empty")
    return batches


def check_some_batches(total: float, who: str) -> None:
    """ValueError when ``total``, the batch count summed over processes, is 0."""
    if total == 0:
        raise ValueError(f"{who}: no batches on any of the {world_size()} processes")


def scalar_loss(loss, who: str) -> torch.Tensor:
    """What loss_fn returned, as a scalar tensor: a tensor as is, or the ``loss`` of a Hugging
    Face ModelOutput (any Mapping with a tensor under ``"loss"``, so ``loss_fn`` may be
    ``lambda model, batch: model(**batch)`` on batches with labels). TypeError / ValueError
    naming ``who`` and what came back otherwise."""
    if isinstance(loss, Mapping) and isinstance(loss.get("loss"), torch.Tensor):
        loss = loss["loss"]
    if not isinstance(loss, torch.Tensor):
        kind = type(loss).__name__ + (" without a loss" if isinstance(loss, Mapping) else "")
        raise TypeError(f"{who}: loss_fn must return a scalar tensor (or a ModelOutput with a loss, "
                        f"i.e. called with labels), got {kind}")
    if loss.ndim != 0:
        raise ValueError(f"{who}: loss_fn must return a scalar tensor, got shape {tuple(loss.shape)} "
                         "(reduce it, e.g. with .mean())")
    return loss


def compute_loss(loss_fn, model, batch, need_grad: bool = True, who: str = "loss_fn") -> torch.Tensor:
    """loss_fn(model, batch) as :func:`scalar_loss`, checked (if need_grad) to have a graph."""
    with torch.enable_grad():
        loss = scalar_loss(loss_fn(model, batch), who)
    if need_grad and not loss.requires_grad:
        raise ValueError(f"{who}: the loss does not depend on the targeted weights (did loss_fn run "
                         "under torch.no_grad() or detach the output?)")
    return loss


def check_positive(name: str, value: int) -> int:
    """``value`` as a Python int >= 1 (numpy integers included), else ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def check_seed(value) -> int:
    """``seed`` as a Python int (numpy and 0-dim torch integers included), else ValueError naming
    it. Probes are keyed by the seed's repr, so ``np.int64(3)`` or ``torch.tensor(3)`` passed on
    as is would draw other probes than ``3``; ``None`` or ``0.5`` would be taken silently."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_floating_point() \
            and value.dtype != torch.bool:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {value!r}")
    return int(value)


class NonFiniteProducts(RuntimeError):
    """A Hessian estimator got too few finite Hessian-vector products to give an estimate."""


def non_finite_loss_message(who: str, index: int, value: float) -> str:
    return (f"{who}: the loss on batch {index} is {value:.6g} (not finite): check the loss on these "
            "batches (a mean over no examples, e.g. every label equal to ignore_index, is NaN)")


def check_finite_loss(loss: torch.Tensor, index: int, who: str) -> None:
    """RuntimeError naming batch ``index`` when its loss is NaN or inf (one host sync)."""
    if not bool(torch.isfinite(loss.detach())):
        raise RuntimeError(non_finite_loss_message(who, index, float(loss.detach())))


def no_gradient_error(who: str, names: list[str]) -> RuntimeError:
    """The error for a loss that has a graph but gives none of the targeted weights a gradient.

    Besides a loss that really ignores them, the usual cause is reentrant activation checkpointing
    (``torch.utils.checkpoint(..., use_reentrant=True)``, e.g. transformers'
    ``gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})``):
    the weights inside a checkpointed block are not in the graph ``torch.autograd.grad`` walks,
    so their gradients come back as None and every sensitivity would silently be 0."""
    return RuntimeError(
        f"{who}: none of the {len(names)} targeted layers (e.g. {names[:3]}) gets a gradient from the "
        "loss: either the loss does not use them, or they run under reentrant activation checkpointing "
        "(torch.utils.checkpoint with use_reentrant=True), whose weights torch.autograd.grad cannot "
        "reach; use use_reentrant=False or turn checkpointing off while measuring")
