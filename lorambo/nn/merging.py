"""Merging a LoRAMBoLinear's adapter into its base weight, and taking it out again.

:class:`AdapterMerge` is a base class of :class:`lorambo.nn.lora_linear.LoRAMBoLinear` holding
its merge methods; the state they read and write (the pools, ``scaling``, ``merged``, the copy
of the weight kept for an exact unmerge, the tied holders) is the layer's own. The delta is
computed in float64 and added with one rounding; a merge that would overflow the weight dtype
is refused (``merge_overflow.py``).
"""

from __future__ import annotations

import torch
from torch.nn.utils import parametrize

from lorambo.nn.merge_overflow import finite_merge, merge_may_overflow
from lorambo.nn.shared_memory import share_memory

__all__ = ["AdapterMerge"]


class AdapterMerge:
    """The merge methods of LoRAMBoLinear (see the module doc)."""

    def delta_weight(self) -> torch.Tensor:
        """``s * B_r A_r`` as an [out, in] tensor in the weight dtype (accumulated in >= fp32)."""
        r = self._rank
        acc = torch.promote_types(self.lora_A.dtype, torch.float32)
        delta = (self.lora_B[:, :r].to(acc) @ self.lora_A[:r].to(acc)) * self.scaling
        return delta.to(self.lora_A.dtype)

    @torch.no_grad()
    def merge(self, exact: bool = True) -> None:
        """Add the adapter into the base weight (one rounding, computed in float64).

        ``exact=True`` keeps a copy of the original weight so :meth:`unmerge` restores it bit
        for bit. ``exact=False`` saves that memory, and unmerge subtracts the delta again (in
        float64), so each restored element w' of an original w with delta d satisfies
        ``|w' - w| <= 2u * max(|w|, |w + d|)``, u the unit roundoff of the weight dtype
        (2^-24 float32, 2^-11 float16, 2^-8 bfloat16): two roundings, one per direction. A cast
        between merge and unmerge rounds the pools too, so the delta subtracted is not the one
        added: docs/model.md (*LoRAMBoLinear*, merge) states the bound then.
        """
        if self.merged:
            raise RuntimeError(f"{self._label}: already merged")
        self.check_mergeable()
        self.check_base_writable("merge")
        base_w = self.base_layer.weight
        merged = finite_merge(self._label, base_w, self._delta_as_base_layout())
        self._weight_before_merge = base_w.detach().clone() if exact else None
        base_w.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def check_merge_finite(self, caller: str = "merge") -> None:
        """Raise, naming ``caller``, if :meth:`merge` would put inf/NaN into the base weight (an
        adapter too large for a float16 weight, say); a model-level merge checks every layer
        first, so that it changes none of them then. Cheap unless the weight is near overflow."""
        if merge_may_overflow(self.base_layer.weight, self.lora_A, self.lora_B, self._rank, self.scaling):
            finite_merge(self._label, self.base_layer.weight, self._delta_as_base_layout(), caller)

    def check_mergeable(self) -> None:
        """Raise if :meth:`merge` cannot write into the base weight: a parametrized weight
        (``torch.nn.utils.parametrize``) is recomputed on every access, so a merge would be lost;
        inside ``lorambo.disable_adapter`` the forward runs the base layer alone, which a merge
        would turn back into the adapted layer; a weight tied to another module's (as
        ``configure_model`` found it, see :meth:`note_tied_weight`) would change that module too."""
        if self.adapter_disabled:
            raise RuntimeError(f"{self._label}: cannot merge inside lorambo.disable_adapter(), whose forward "
                               "runs the base weight alone: merging would put the adapter back into it. "
                               "Merge after the with-block")
        self._refuse_swapped_base()
        tied = [name for name, module, attr in self._tied_holders
                if share_memory(module._parameters.get(attr), self.base_layer.weight)]
        if tied:
            raise RuntimeError(f"{self._label}: the base weight is tied to {tied}: merging the adapter would "
                               "change them too. Untie it first (give the layer a weight of its own), or keep the "
                               "adapter unmerged")
        if parametrize.is_parametrized(self.base_layer, "weight"):
            raise RuntimeError(f"{self._label}: the base weight is computed by a parametrization "
                               f"({type(self.base_layer).__name__}), so a merge would not stay in it; keep the "
                               "adapter unmerged, or remove the parametrization first "
                               "(torch.nn.utils.parametrize.remove_parametrizations)")

    def check_base_writable(self, caller: str) -> None:
        """Raise, naming ``caller``, where the base weight is an inference tensor (the base layer
        was built under ``torch.inference_mode()``) and inference mode is off: PyTorch refuses
        every in-place write to such a tensor there, and merge / unmerge write into it. (The
        layer's own pools are plain tensors, whatever the mode it was built in.)"""
        if self.base_layer.weight.is_inference() and not torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self._label}: {caller} cannot write into the base weight: it was made under "
                               "torch.inference_mode() (an inference tensor), and PyTorch refuses in-place writes "
                               "to those outside inference mode. Call it inside torch.inference_mode(), or build "
                               "the base layer outside it")

    def note_tied_weight(self, holders) -> None:
        """Record the other places the model holds this layer's base weight, as
        ``(dotted name, module, attribute)``; :meth:`merge` refuses while one of them still
        holds it (a weight untied later, by assigning the layer a weight of its own, merges).

        The base weight's key is also declared tied (``_tied_weights_keys``, which transformers'
        ``save_pretrained`` reads from every submodule): a model declares the plain key
        (``lm_head.weight``); undeclared, ``lm_head.base_layer.weight`` shares memory with the
        embedding under no declared key, and the save raises instead of writing one copy."""
        self._tied_holders = tuple(holders)
        # transformers reads only the keys of a submodule that is not a PreTrainedModel
        self._tied_weights_keys = {"base_layer.weight": self._tied_holders[0][0]} if self._tied_holders else None

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`."""
        if not self.merged:
            raise RuntimeError(f"{self._label}: not merged")
        self.check_base_writable("unmerge")
        self.base_layer.weight.copy_(self._unmerged_weight())
        self._weight_before_merge = None
        self.merged = False

    def _unmerged_weight(self, copy: bool = False) -> torch.Tensor:
        """The base weight :meth:`unmerge` would restore (the kept copy, else weight - delta);
        with ``copy``, never the kept copy itself."""
        base_w = self.base_layer.weight.detach()
        if self._weight_before_merge is not None:  # kept at merge time: a later .to() did not move it
            return self._weight_before_merge.to(device=base_w.device, dtype=base_w.dtype, copy=copy)
        return (base_w.double() - self._delta_as_base_layout()).to(base_w.dtype)

    def _delta_as_base_layout(self) -> torch.Tensor:
        r = self._rank
        delta = (self.lora_B[:, :r].double() @ self.lora_A[:r].double()) * self.scaling  # (out, in)
        return delta if self.base_kind == "linear" else delta.t()
