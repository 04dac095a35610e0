"""Refuse transformers' ``resize_token_embeddings`` before it changes anything while the output
head is adapted.

An adapted head's LoRA pools have one row of ``lora_B`` per token, so the layer cannot change
its number of outputs (``LoRAMBoLinear.out_features`` refuses). transformers resizes the input
embedding first and the head second: an untied adapted head raised transformers' own TypeError
after the input embedding had its new size, and a tied one had the shared weight resized in
place, so both left the model half-changed. No attribute of the head is read before the input
embedding changes, so :func:`sync_resize_guards` puts a :class:`ResizeGuard` in place of the
method on each transformers model whose output embedding is a ``LoRAMBoLinear`` (an instance
attribute, as accelerate does for ``forward``), after every configure and unload, and takes it
away once the head is plain again. The guard checks the size the call would give (transformers'
rule for ``pad_to_multiple_of``) and either refuses, naming the head, or calls the model's own
method. A call that keeps the size (``resize_token_embeddings(len(tokenizer))`` with an
unchanged vocabulary) passes through.

The guard holds the model: deep copies and pickles get a guard of their own copy; a shallow
``copy.copy`` of a model shares its attributes, the guard included, as it shares its modules.
"""

from __future__ import annotations

import inspect

from torch import nn

from lorambo.nn import LoRAMBoLinear

__all__ = ["ResizeGuard", "sync_resize_guards"]

_METHOD = "resize_token_embeddings"


class ResizeGuard:
    """``model.resize_token_embeddings`` while ``model``'s output embedding is adapted."""

    def __init__(self, model: nn.Module, previous=None):
        self.model, self.previous = model, previous  # previous: an instance attribute it replaced

    def _resize(self):
        return self.previous if self.previous is not None else getattr(type(self.model), _METHOD).__get__(self.model)

    def __call__(self, *args, **kwargs):
        resize = self._resize()
        try:
            bound = inspect.signature(resize).bind(*args, **kwargs)
        except TypeError:
            return resize(*args, **kwargs)  # transformers' own error for a wrong call
        bound.apply_defaults()
        size = _target_size(self.model, bound.arguments.get("new_num_tokens"),
                            bound.arguments.get("pad_to_multiple_of"))
        head = _adapted_head(self.model)
        if size is not None and head is not None and size != head.out_features:
            raise ValueError(
                f"resize_token_embeddings: the output embedding, {head._label}, is adapted: its LoRA pools "
                f"hold {head.out_features} output rows, so the vocabulary cannot become {size}. Nothing was "
                "changed. Save the adapter if needed, lorambo.unload(model) (merge=True keeps the head's "
                "adapter in its weight), resize, and configure again")
        return resize(*args, **kwargs)


def _target_size(model: nn.Module, new_num_tokens, pad_to_multiple_of):
    """The number of tokens transformers resizes to, or None where it changes nothing or refuses
    the arguments itself (before changing anything: a multiple that is no int, or 0)."""
    if pad_to_multiple_of is not None:
        if not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of == 0:
            return None
        if new_num_tokens is None:
            new_num_tokens = model.get_input_embeddings().weight.shape[0]
        # transformers' rule word for word: it takes True as 1 and rounds a negative multiple too
        return (new_num_tokens + pad_to_multiple_of - 1) // pad_to_multiple_of * pad_to_multiple_of
    return new_num_tokens


def _adapted_head(model: nn.Module) -> LoRAMBoLinear | None:
    try:
        head = model.get_output_embeddings()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, LoRAMBoLinear) else None


def sync_resize_guards(model: nn.Module) -> None:
    """A guard on every transformers model in ``model`` whose output head is adapted; none on the others."""
    for module in model.modules():
        if not callable(getattr(type(module), _METHOD, None)) or not hasattr(module, "get_output_embeddings"):
            continue
        held = module.__dict__.get(_METHOD)
        guarded = isinstance(held, ResizeGuard)
        if _adapted_head(module) is not None and not guarded:
            module.__dict__[_METHOD] = ResizeGuard(module, previous=held)
        elif guarded and _adapted_head(module) is None:
            if held.previous is None:
                del module.__dict__[_METHOD]
            else:
                module.__dict__[_METHOD] = held.previous
