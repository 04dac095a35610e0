"""What a forward keeps for its backward, counted in bytes (the ops' activation memory)."""

from torch.autograd.graph import saved_tensors_hooks


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
