"""Which frozen base layers LoRAMBoLinear can wrap: nn.Linear and transformers' Conv1D."""

from __future__ import annotations

import sys

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize, prune
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm


def _conv1d_class():
    # Only look when transformers is already imported: no Conv1D can exist otherwise, and
    # importing transformers costs seconds.
    if "transformers" not in sys.modules:
        return None
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _family(module: nn.Module):
    """(kind, base class) of an nn.Linear or Conv1D, subclasses included; None for anything else."""
    if isinstance(module, nn.Linear):
        return "linear", nn.Linear
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d", conv1d
    return None


# hooks that run only when the module is called; LoRAMBoLinear computes from the weight instead
_CALL_HOOKS = {"_forward_pre_hooks": "forward pre-hooks", "_forward_hooks": "forward hooks",
               "_backward_pre_hooks": "backward pre-hooks", "_backward_hooks": "backward hooks"}


def call_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` that run only when it is called."""
    return [kind for attr, kind in _CALL_HOOKS.items() if getattr(module, attr, None)]


def base_kind(module: nn.Module) -> str | None:
    """'linear', 'conv1d', or None when ``module`` cannot be wrapped. A subclass that brings its
    own forward (a quantized layer, say) cannot, nor a module whose forward was replaced on the
    instance, nor one with hooks on its call (the old ``nn.utils.weight_norm`` computes the
    weight in one): LoRAMBoLinear computes ``x W^T + b`` from the weight and would drop them."""
    family = _family(module)
    if (family is None or type(module).forward is not family[1].forward or "forward" in vars(module)
            or call_hooks(module)):
        return None
    return family[0]


def swapped_reason(module: nn.Module, kind: str) -> str | None:
    """Why the base layer ``module`` of a LoRAMBoLinear built on a ``kind`` layer can no longer
    be computed from its weight, or None: something replaced it after wrapping by a module of
    another class (``torch.ao.quantization.quantize_dynamic`` swaps every nn.Linear, the one
    inside too, for a quantized layer whose ``weight`` is a method)."""
    family = _family(module)
    if family is not None and family[0] == kind and type(module).forward is family[1].forward:
        return None
    built_on = "nn.Linear" if kind == "linear" else "transformers Conv1D"
    if type(module).__module__.split(".")[0] == "peft":
        # peft's all-linear (get_peft_model, transformers' add_adapter / load_adapter) takes the
        # Linear inside each LoRAMBoLinear: a second adapter, which this forward would skip
        return (f"its base layer is now peft's {type(module).__qualname__} ({type(module).__module__}): peft "
                f"(get_peft_model, or transformers' add_adapter / load_adapter) put its own adapter inside this "
                f"lorambo adapter, in place of the {built_on} it was built on. Two adapters on one layer are not "
                "supported: give peft the plain model, or hand lorambo's adapter to peft with "
                "lorambo.export_peft and PeftModel.from_pretrained")
    return (f"its base layer is now a {type(module).__module__}.{type(module).__qualname__}, put in after the "
            f"layer was adapted (by a quantization pass that swaps Linear layers, say), not the {built_on} it was "
            f"built on, whose weight it computes x W^T + b with. Merge and unload the adapters "
            "(lorambo.unload(model, merge=True)) before such a pass")


def is_wrappable(module: nn.Module) -> bool:
    return base_kind(module) is not None


def unwrappable_reason(module: nn.Module) -> str:
    """Why ``module`` cannot be wrapped, for error messages."""
    family = _family(module)
    if isinstance(module, LazyModuleMixin) and module.has_uninitialized_params():
        return (f"this {type(module).__name__} is not initialised yet (a lazy module before its first forward): "
                "its weight has no shape. Run one forward with a dummy batch first")
    if family is not None and "forward" in vars(module):
        return (f"this {type(module).__name__}'s forward was replaced on the instance (accelerate's offload "
                "hooks, say), which LoRAMBoLinear, computing x W^T + b from the weight, would drop")
    if family is not None and call_hooks(module):
        return hooks_reason(module)
    if family is not None:
        return (f"{type(module).__name__} subclasses {family[1].__name__} with a forward of its own (a quantized "
                "or otherwise changed layer), which LoRAMBoLinear, computing x W^T + b from the weight, would drop")
    if isinstance(module, nn.Bilinear):
        shape = list(module.weight.shape)
        return (f"{type(module).__name__} computes x1^T A x2 + b from two inputs: its weight {shape} is one "
                f"{shape[1]}x{shape[2]} bilinear form per output, not an [out, in] matrix applied to one input, "
                "and a LoRA update B A applies to one input's x W^T; lorambo adapts nn.Linear / transformers "
                "Conv1D layers only")
    stacked = stacked_weights(module)
    if stacked:
        return (f"{type(module).__name__} holds its weights as stacked 3-D parameters ({', '.join(stacked)}), as "
                "fused MoE experts do; lorambo adapts nn.Linear / transformers Conv1D layers only")
    return f"{type(module).__name__} is not nn.Linear or transformers Conv1D"


def stacked_weights(module: nn.Module) -> list[str]:
    """``'name [shape]'`` of ``module``'s own 3-D parameters holding several matrices, outside
    convolutions: one matrix per expert stacked in one tensor (transformers' fused MoE experts,
    e.g. ``MixtralExperts.gate_up_proj`` [experts, 2 * ffn, hidden]), which no Linear holds. A
    leading dimension of 1 is a single tensor (ViT's cls_token [1, 1, hidden]), not a stack; nor
    is nn.Bilinear's weight [out, in1, in2], one bilinear form per output."""
    if isinstance(module, (nn.modules.conv._ConvNd, nn.Bilinear)):
        return []
    return [f"{n} {list(p.shape)}" for n, p in module.named_parameters(recurse=False)
            if p.dim() == 3 and p.shape[0] > 1]


def offload_hint(module: nn.Module) -> str:
    """Why the weight of the base layer ``module`` may be elsewhere than its input: accelerate's
    offloading (``cpu_offload``, ``disk_offload``, ``dispatch_model`` with a device_map holding
    'cpu' or 'disk') keeps it on the meta device or the offload device and attaches a hook
    (``_hf_hook``) that moves it in only when the module itself is called. '' without such a hook."""
    if getattr(module, "_hf_hook", None) is None:
        return ""
    return ("; its base layer carries accelerate's hook (offloaded by cpu_offload / disk_offload / dispatch_model "
            "with 'cpu' or 'disk' in the device_map), which brings its weight in only when the base layer itself is "
            "called, and LoRAMBoLinear computes x W^T + b from the weight without calling it. Keep the adapted layers "
            "on the execution device (offload other modules), or merge and unload the adapters "
            "(lorambo.unload(model, merge=True)) before offloading")


def _weight_hook_fix(module: nn.Module) -> str | None:
    """What to do instead, where a forward pre-hook on ``module`` is one of torch's that
    recompute a tensor of the module before each call; None for any other hook."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, prune.BasePruningMethod):  # a PruningContainer too, after several prune calls
            name = hook._tensor_name
            return (f"torch.nn.utils.prune recomputes its {name} from {name}_orig and {name}_mask in one. Make "
                    f"the pruning permanent first (torch.nn.utils.prune.remove(module, {name!r})), or prune "
                    "after lorambo.unload(model, merge=True)")
        if isinstance(hook, WeightNorm):
            return ("the old nn.utils.weight_norm recomputes the weight in one: use "
                    "nn.utils.parametrizations.weight_norm, which works")
        if isinstance(hook, SpectralNorm):
            return ("the old nn.utils.spectral_norm recomputes the weight in one: use "
                    "nn.utils.parametrizations.spectral_norm, which works")
    return None


def hooks_reason(module: nn.Module) -> str:
    reason = (f"this {type(module).__name__} has {' and '.join(call_hooks(module))}, which run only when it is "
              "called; LoRAMBoLinear computes x W^T + b from its weight without calling it and would never run "
              "them")
    fix = _weight_hook_fix(module)
    if fix is not None:
        return f"{reason}: {fix}"
    return (f"{reason} (nn.utils.weight_norm computes the weight in one: use "
            "nn.utils.parametrizations.weight_norm). Remove them, or register them on the LoRAMBoLinear")


def features(module: nn.Module, kind: str) -> tuple[int, int]:
    """(in_features, out_features). Conv1D stores its weight as [in, out]."""
    if kind == "linear":
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]


def weight_dtype_device(module: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The base weight's dtype and device, without computing a parametrized weight: each read of a
    spectral_norm weight in training mode runs a power iteration, so reads at wrap time would make
    the wrapped layer's outputs differ from the unwrapped one's. A parametrized weight's are those
    of its (first) unconstrained tensor; torch keeps the shape, and the forward checks dtype and
    device of the computed weight."""
    if parametrize.is_parametrized(module, "weight"):
        chain = module.parametrizations.weight
        source = chain.original if chain.is_tensor else chain.original0
        return source.dtype, source.device
    weight = module.weight
    return weight.dtype, weight.device


def weight_out_in(module: nn.Module, kind: str) -> torch.Tensor:
    """The base weight as an [out, in] tensor (a view for Conv1D, no copy)."""
    return module.weight if kind == "linear" else module.weight.t()
