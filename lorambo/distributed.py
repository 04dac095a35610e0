"""Every collective lorambo takes over torch.distributed, and nothing else (the bottom floor: it
imports nothing from lorambo; see docs/architecture.md).

Two uses, one module:

- Sensitivity estimators reduce *sums* (per-probe quadratic forms, Hessian-vector products,
  squared gradient norms, x x^T sums) together with the *count* they were summed over, then
  divide, so every process ends with the estimate of the mean loss over the union of all
  processes' batches (processes must use the same seed).
- Online rank decisions change parameters (which slots are active, how new rows of A are
  initialised), and under DDP every replica must stay bitwise identical, so every process must
  take *the same* decision from *the same* numbers: statistics are summed or averaged over
  processes; the few small results a decision is taken from (singular values and vectors) are then
  broadcast from process 0 with :func:`broadcast_`, which removes any last-bit difference that
  floating-point reductions or LAPACK threading could leave; random numbers come from
  :func:`decision_generator`, never from the global RNG state, which differs across processes.

An exception raised on one process only (bad input, a bad path) must not leave the others waiting
forever in a collective that process never joins: :class:`SharedFailure` holds it back until the
next collective, which carries a failure count and a fingerprint of the settings every process
must share, so every process raises.

Naming states the semantics: a trailing underscore (``all_reduce_sum_``, ``broadcast_``) writes
the result into the argument and returns it; ``all_reduced_*`` returns the result and leaves the
argument untouched (the result is the argument itself when there is only one process, so do not
modify it unless you own the argument). Every function is a no-op without an initialised process
group. NCCL only talks CUDA: CPU tensors travel through the current CUDA device and come back.
"""

from __future__ import annotations

import hashlib
import numbers
import pickle
import zlib

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "world_size", "process_rank", "is_main_process", "all_reduce_sum_",
           "all_reduced_sum", "all_reduced_mean", "all_reduced_sums", "broadcast_",
           "decision_generator", "check_identical", "SharedFailure"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def process_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return process_rank() == 0


def _comm_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself when the backend can use it in place, else a contiguous copy it can use."""
    if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
        return tensor.to(torch.device("cuda", torch.cuda.current_device()))
    return tensor.contiguous()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` with its sum over processes and return it."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_reduced_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over processes, on ``tensor``'s device; ``tensor`` is left untouched."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    if work is tensor:
        work = tensor.clone()
    dist.all_reduce(work, op=dist.ReduceOp.SUM)
    return work.to(tensor.device)


def all_reduced_mean(tensor: torch.Tensor) -> torch.Tensor:
    """The mean of ``tensor`` over processes (the statistic of the DDP-averaged gradient);
    ``tensor`` is left untouched."""
    if not is_distributed():
        return tensor
    return all_reduced_sum(tensor) / world_size()


_BUCKET_ELEMENTS = 1 << 26  # 256 MiB of fp32 per packed collective


def all_reduced_sums(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sum over processes of every tensor, with as few collectives as possible: tensors of one
    dtype and device are packed into flat buffers of up to 2^26 elements (one collective each) and
    unpacked into new tensors. The inputs are left untouched (and returned when alone)."""
    if not is_distributed():
        return list(tensors)
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.dtype, t.device), []).append(i)
    for idx in groups.values():
        start = 0
        while start < len(idx):
            stop, size = start + 1, tensors[idx[start]].numel()
            while stop < len(idx) and size + tensors[idx[stop]].numel() <= _BUCKET_ELEMENTS:
                size += tensors[idx[stop]].numel()
                stop += 1
            chunk = idx[start:stop]
            packed = all_reduce_sum_(torch.cat([tensors[i].reshape(-1) for i in chunk]))
            pos = 0
            for i in chunk:
                out[i] = packed[pos:pos + tensors[i].numel()].view(tensors[i].shape)
                pos += tensors[i].numel()
            start = stop
    return out


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` with process ``src``'s copy and return it."""
    if not is_distributed():
        return tensor
    work = _comm_tensor(tensor)
    dist.broadcast(work, src=src)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def decision_generator(seed: int, *keys) -> torch.Generator:
    """A CPU generator seeded from ``(seed, *keys)`` by CRC32 of their repr: stable across
    processes and Python runs (``hash()`` of a str is salted per process). Integer keys count by
    value: a numpy step (``np.int64(5)``, whose repr is not ``5``) seeds what ``5`` does."""
    keys = tuple(int(k) if isinstance(k, numbers.Integral) and not isinstance(k, bool) else k for k in keys)
    g = torch.Generator(device="cpu")
    g.manual_seed(zlib.crc32(repr((int(seed),) + keys).encode()))
    return g


def check_identical(obj, what: str = "decisions") -> None:
    """Raise RuntimeError when processes disagree on ``obj`` (compared by a digest of its pickle).

    A debugging guard: if it ever fires, some decision input was not reduced or broadcast.
    """
    if not is_distributed():
        return
    digest = hashlib.sha256(pickle.dumps(obj)).hexdigest()
    digests = [None] * world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise RuntimeError(f"DDP processes took different {what}: digests per process {digests}")


class SharedFailure:
    """Hold back an exception raised on this process until every process can raise it, and check
    that every process passed the same ``settings``.

    Without this, a process that raises between two collectives leaves the others blocked in the
    next one forever, and processes given different settings (seeds, probe counts, budgets) take
    different decisions or different numbers of collectives. Use::

        failure = SharedFailure("gradient_sensitivity", settings={"targets": names})
        with failure:
            ...local work that may raise...
        summed = failure.sum_and_check(sums)  # the all-reduce that runs anyway, status included

    :meth:`status` is 3 numbers: 1.0 where this process failed, and a 20-bit fingerprint f of
    ``settings`` with f^2; summed over n processes, they all passed the same iff
    n * sum(f^2) == sum(f)^2 (exact in float64 below 2^12 processes).

    The exception is held back only under a process group of two or more processes (elsewhere it
    propagates at once, as without this class), and only ``Exception``s (KeyboardInterrupt ends
    the process). When any process failed, every process raises: the failing ones their own
    exception, the others a RuntimeError naming the failing processes and their errors. When the
    settings differ, every process raises a ValueError naming the settings and their values per
    process. Either costs one ``all_gather_object``, on that path only. :meth:`sum_and_check`
    folds the status into an all-reduce of the caller's sums; :meth:`check` is the same with a
    collective of its own, for code that has no collective to fold the status into.
    """

    def __init__(self, who: str, settings=None):
        self.who, self.settings = who, settings
        self.error: Exception | None = None

    def __enter__(self) -> "SharedFailure":
        return self

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, Exception) and world_size() > 1:
            self.error = error
            return True
        return False

    def status(self, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
        """[failed, f, f^2]: this process's summand of the status :meth:`raise_if_any` reads."""
        f = zlib.crc32(repr(self.settings).encode()) & 0xFFFFF
        return torch.tensor([float(self.error is not None), float(f), float(f * f)], dtype=dtype, device=device)

    def raise_if_any(self, summed) -> None:
        """Raise on every process when ``summed`` (the all-reduced sum of :meth:`status`, any
        sequence of 3 numbers) says a process failed or the settings differ."""
        failed, total, total_sq = (int(float(x)) for x in summed)
        differ = world_size() * total_sq != total * total
        if not failed and not differ:
            return
        self._raise(bool(failed))

    def _raise(self, failed: bool) -> None:
        """Raise on every process (one ``all_gather_object`` of the errors and settings): this
        process's own error, else a RuntimeError naming the processes that failed (``failed``),
        else a ValueError naming the settings that differ."""
        seen = [None] * world_size()
        mine = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
        dist.all_gather_object(seen, (mine, self.settings))
        if self.error is not None:
            raise self.error
        if failed:
            named = "; ".join(f"process {r}: {e}" for r, (e, _) in enumerate(seen) if e is not None)
            raise RuntimeError(f"{self.who} failed on another process ({named}); process "
                               f"{process_rank()} stops too instead of waiting for it in a collective")
        raise ValueError(f"{self.who}: the processes passed different settings "
                         f"({_differences([s for _, s in seen])}); every process must pass the same")

    def sum_and_check(self, values: torch.Tensor) -> list[float]:
        """``values`` (1-D float64) summed over the processes, as Python floats, by one all-reduce
        that also carries :meth:`status`; raises first, as :meth:`raise_if_any` does."""
        summed = all_reduce_sum_(torch.cat([values, self.status(device=values.device)])).tolist()
        self.raise_if_any(summed[-3:])
        return summed[:-3]

    def broadcast_and_check(self, values: torch.Tensor) -> list[float]:
        """Process 0's ``values`` (1-D float64) on every process, as Python floats, by the
        all-reduce that also carries :meth:`status`: the other processes add zeros, and x + 0 is
        x exactly. Raises first, as :meth:`raise_if_any` does, so a process that failed may pass
        any values of the right length."""
        if process_rank() != 0:
            values = torch.zeros_like(values)
        return self.sum_and_check(values)

    def check(self) -> None:
        """:meth:`raise_if_any` after a collective of its own (one small all-reduce)."""
        if world_size() > 1:
            self.raise_if_any(all_reduce_sum_(self.status()).tolist())

    # A computation with several collectives (a rank decision's power iteration, its growths)
    # runs each local step through run() and each collective through mean() / broadcast(): a
    # process whose step failed skips its later steps but still joins every collective, whose
    # flag then makes every process raise, instead of leaving the others waiting in it.

    def run(self, fn, *args):
        """``fn(*args)`` under this guard; None, without calling it, once an error is held or
        when an argument is None (the result of a step skipped or failed before)."""
        if self.error is not None or any(a is None for a in args):
            return None
        with self:
            return fn(*args)
        return None  # the error is held back (a process group of two or more)

    def mean(self, tensor: torch.Tensor | None, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """:func:`all_reduced_mean` of the flat ``tensor`` (``numel`` elements; None where this
        process failed) by one all-reduce that also carries a failure flag; raises on every
        process when one failed."""
        if world_size() == 1:
            return all_reduced_mean(tensor)
        return self._flagged_sum(tensor, numel, dtype, device) / world_size()

    def broadcast(self, tensor: torch.Tensor | None, numel: int, dtype: torch.dtype, device) -> torch.Tensor:
        """Process 0's flat ``tensor`` on every process, by the flagged all-reduce of
        :meth:`mean` (the other processes add zeros: x + 0 is x); raises as :meth:`mean` does."""
        if world_size() == 1:
            return broadcast_(tensor)
        if process_rank() != 0:
            tensor = None if tensor is None else torch.zeros_like(tensor)
        return self._flagged_sum(tensor, numel, dtype, device)

    def _flagged_sum(self, tensor, numel: int, dtype, device) -> torch.Tensor:
        work = torch.zeros(numel + 1, dtype=dtype, device=device)
        if tensor is not None and self.error is None:
            work[:numel] = tensor.reshape(-1)
        work[numel] = float(self.error is not None)
        all_reduce_sum_(work)
        if float(work[numel]) != 0.0:  # one host read: how many processes failed
            self._raise(True)
        return work[:numel]


def _differences(settings: list) -> str:
    """The entries of per-process settings that differ, with each process's value."""
    if all(isinstance(s, dict) for s in settings):
        keys = list(dict.fromkeys(k for s in settings for k in s))
        keys = [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]
        return "; ".join(f"{k}: " + ", ".join(f"process {r} {s.get(k)!r}" for r, s in enumerate(settings))
                         for k in keys)
    return ", ".join(f"process {r} {s!r}" for r, s in enumerate(settings))
