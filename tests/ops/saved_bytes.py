"""What a forward keeps for its backward, counted in bytes (the ops' activation memory), and the
layer operands and op callers the memory tests share."""

import contextlib

import torch
from torch.autograd.graph import saved_tensors_hooks
from torch.utils.flop_counter import FlopCounterMode

from lorambo.ops.custom_op import seed_tensor


def saved_bytes(run, params, context) -> int:
    """Bytes of the distinct storages ``run()`` saves for backward, besides those of ``params``
    (parameters are held anyway), with ``run`` called inside ``context()``."""
    held = {p.untyped_storage().data_ptr() for p in params}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in held:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with saved_tensors_hooks(pack, lambda tensor: tensor), context():
        run()
    return sum(storages.values())


def layer_operands(seed, out_features, in_features, capacity, train_a, train_b):
    """weight [out, in] and bias (frozen), lora_A [capacity, in] and lora_B [out, capacity]
    (trained as asked), float32, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    bias = 0.3 * torch.randn(out_features, generator=gen)
    lora_A = (torch.randn(capacity, in_features, generator=gen) / in_features**0.5).requires_grad_(train_a)
    lora_B = (0.3 * torch.randn(out_features, capacity, generator=gen)).requires_grad_(train_b)
    return weight, bias, lora_A, lora_B


def op_runner(op, path, rank, scaling, p, seed):
    """f(x, weight, bias, lora_A, lora_B) -> y through ``op`` on ``path`` ("eager": the backend's
    autograd Function; "custom_op": the torch.library ops, reached through a TorchDispatchMode,
    here FlopCounterMode; "compiled": torch.compile(fullgraph=True) over them), and the context
    to call it in."""

    def f(x, weight, bias, lora_A, lora_B):
        return op(x, weight, bias, lora_A, lora_B, rank, scaling, p, seed_tensor(seed))

    if path == "compiled":
        torch._dynamo.reset()
        return torch.compile(f, fullgraph=True, backend="aot_eager"), contextlib.nullcontext
    return f, (contextlib.nullcontext if path == "eager" else lambda: FlopCounterMode(display=False))
