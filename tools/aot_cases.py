"""Kernel variants for tools/aot_sm90.py: what one compile is, and how a launch maps to one.

A :class:`Case` is one variant the GPU would compile: a ``@triton.jit`` kernel with its
signature, constexprs, alignment attributes and launch options, derived from a launch exactly as
``JITFunction.run`` derives them (:func:`bind`); :class:`Result` is what compiling it gave. Cases
travel to the compile workers as JSON (:meth:`Case.to_json`). A development tool, beside
aot_sm90.py, outside the installed packages.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil

import triton
import triton.language as tl

import lorambo_kernels

__all__ = ["Case", "Result", "bind", "is_constexpr", "jit_functions", "jit_parts", "jit_types"]

_TL_DTYPE = "__tl_dtype__"  # JSON tag for a triton dtype constexpr (sent to compile workers)


# ---------------------------------------------------------------------------------- cases
@dataclasses.dataclass(frozen=True)
class Case:
    """One kernel variant: what ``JITFunction.run`` would hand to ``triton.compile``.

    ``kernel`` is "module:name"; the other fields are (name, value) pairs in parameter order;
    ``example`` (not part of equality) names the first launch that produced it."""

    kernel: str
    signature: tuple
    constexprs: tuple
    attrs: tuple
    options: tuple
    example: str = dataclasses.field(default="", compare=False)

    @property
    def name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    def declared_constexprs(self) -> dict:
        """Values of the kernel's own ``tl.constexpr`` parameters (not ints specialized to 1)."""
        declared = _declared_constexpr_names(self.kernel)
        return {k: v for k, v in self.constexprs if k in declared}

    def config_key(self) -> tuple:
        """The case without Triton's value specialization of run-time ints (16-divisibility, == 1:
        shapes and strides): the kernel as the launcher configures it (constexprs, options and
        argument types, i64 seeds included)."""
        declared = _declared_constexpr_names(self.kernel)
        sig = tuple((k, "i32" if t == "constexpr" and k not in declared else t) for k, t in self.signature)
        return (self.kernel, sig, tuple(self.declared_constexprs().items()), self.options)

    def label(self, specialization: bool = True) -> str:
        """Readable and (within a sweep) unique: kernel, dtypes, constexprs, options, then (with
        ``specialization``) the ints specialized to 1 and the ints not divisible by 16."""
        declared, nospec = _kernel_info(self.kernel)
        ptrs = sorted({t[1:] for _, t in self.signature if t.startswith("*")})
        descs = sorted({t[len("tensordesc<"):].split("[")[0] for _, t in self.signature if t.startswith("tensordesc")})
        parts = ["/".join(ptrs + [f"desc:{d}" for d in descs if d not in ptrs])]
        for k, v in self.constexprs:
            if k in declared:
                parts.append(f"{k}={_short(v)}")
        parts += [f"{k}={v}" for k, v in self.options]
        i64 = [k for k, t in self.signature if t == "i64"]
        if i64:
            parts.append("i64:" + "+".join(i64))
        if specialization:
            ones = [k for k, v in self.constexprs if k not in declared]
            if ones:
                parts.append("1:" + "+".join(ones))
            nodiv = [k for k, t in self.signature if t in ("i32", "i64") and k not in dict(self.attrs)
                     and k not in nospec]
            if nodiv:
                parts.append("nodiv:" + "+".join(nodiv))
        return f"{self.name}[{','.join(parts)}]"

    def test_id(self) -> str:
        return self.label().replace("[", "-").rstrip("]")

    def to_json(self) -> dict:
        constexprs = [(k, {_TL_DTYPE: v.name} if isinstance(v, tl.dtype) else v) for k, v in self.constexprs]
        return {"kernel": self.kernel, "signature": list(self.signature), "constexprs": constexprs,
                "attrs": [[k, v] for k, v in self.attrs], "options": list(self.options), "example": self.example}

    @staticmethod
    def from_json(d: dict) -> "Case":
        constexprs = tuple((k, tl.dtype(v[_TL_DTYPE]) if isinstance(v, dict) and _TL_DTYPE in v else v)
                           for k, v in d["constexprs"])
        return Case(d["kernel"], tuple(map(tuple, d["signature"])), constexprs,
                    tuple((k, tuple(tuple(a) for a in v)) for k, v in d["attrs"]), tuple(map(tuple, d["options"])),
                    d.get("example", ""))


@dataclasses.dataclass
class Result:
    case: Case
    ok: bool
    error: str | None = None
    n_regs: int | None = None  # registers per thread (cuobjdump)
    stack: int | None = None  # per-thread stack frame in bytes: register spills (cuobjdump)
    shared: int | None = None  # dynamic shared memory per block in bytes (kernel metadata)
    shared_limit: int | None = None
    seconds: float = 0.0

    @property
    def fits(self) -> bool:
        return self.shared is None or self.shared_limit is None or self.shared <= self.shared_limit

    @property
    def passed(self) -> bool:
        return self.ok and self.fits


def _short(v) -> str:
    return {True: "T", False: "F"}.get(v, str(v)) if isinstance(v, bool) else str(v)


# ------------------------------------------------------------------------ jit objects
def jit_types() -> tuple:
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    return JITFunction, InterpretedFunction


def _kernel_modules() -> list:
    """Every module of the package that defines ``@triton.jit`` functions."""
    mods = []
    for info in pkgutil.iter_modules(lorambo_kernels.__path__):
        if info.name == "__main__":
            continue
        mods.append(importlib.import_module(f"lorambo_kernels.{info.name}"))
    return mods


def jit_functions() -> dict[str, object]:
    """"module:name" -> the ``@triton.jit`` object, for every one defined in the package."""
    types = jit_types()
    found = {}
    for mod in _kernel_modules():
        for name, obj in vars(mod).items():
            if isinstance(obj, types) and getattr(obj.fn, "__module__", None) == mod.__name__:
                found[f"{mod.__name__}:{name}"] = obj
    return found


def jit_parts(obj):
    """(python function, do_not_specialize, do_not_specialize_on_alignment) of a jit object,
    compiled (JITFunction) or interpreted (InterpretedFunction keeps them in ``kwargs``)."""
    if hasattr(obj, "do_not_specialize"):
        return obj.fn, obj.do_not_specialize, obj.do_not_specialize_on_alignment
    return obj.fn, obj.kwargs.get("do_not_specialize") or [], obj.kwargs.get("do_not_specialize_on_alignment") or []


def is_constexpr(param: inspect.Parameter) -> bool:
    ann = param.annotation
    if ann is inspect.Parameter.empty:
        return False
    return ann is triton.language.constexpr or "constexpr" in str(ann)


_INFO: dict[str, tuple[frozenset, frozenset]] = {}


def _kernel_info(kernel: str) -> tuple[frozenset, frozenset]:
    """(declared tl.constexpr parameters, do_not_specialize parameters) of "module:name"."""
    if kernel not in _INFO:
        mod, name = kernel.split(":")
        obj = getattr(importlib.import_module(mod), name)
        obj = getattr(obj, "jit", obj)  # a _Recorder while recording
        fn, dns, _ = jit_parts(obj)
        params = inspect.signature(fn).parameters
        _INFO[kernel] = (frozenset(n for n, p in params.items() if is_constexpr(p)),
                         frozenset(n for i, n in enumerate(params) if i in dns or n in dns))
    return _INFO[kernel]


def _declared_constexpr_names(kernel: str) -> frozenset:
    return _kernel_info(kernel)[0]


_PARAMS: dict[str, list] = {}


def _params(key: str, obj) -> list:
    """[(name, is_constexpr, specialize, align, default)] of a kernel's parameters."""
    if key not in _PARAMS:
        fn, dns, dnsoa = jit_parts(obj)
        out = []
        for i, (name, param) in enumerate(inspect.signature(fn).parameters.items()):
            const = is_constexpr(param)
            if not const and param.annotation is not inspect.Parameter.empty:
                raise NotImplementedError(f"{key}: typed parameter {name}: {param.annotation} (not modelled here)")
            out.append((name, const, not (i in dns or name in dns), not (i in dnsoa or name in dnsoa), param.default))
        _PARAMS[key] = out
    return _PARAMS[key]


def bind(key: str, obj, args, kwargs, backend) -> Case:
    """A launch ``obj[grid](*args, **kwargs)`` as (signature, constexprs, attrs, options), the way
    ``JITFunction.run`` / ``_pack_args`` of triton 3.9 derive them."""
    from triton._C.libtriton import native_specialize_impl

    params = _params(key, obj)
    names = {p[0] for p in params}
    options = {k: v for k, v in kwargs.items() if k not in names}
    if len(args) > len(params) or any(p[0] in kwargs for p in params[:len(args)]):
        raise TypeError(f"{key}: bad launch arguments")
    signature, constexprs, attrs = [], [], []
    for i, (name, const, specialize, align, default) in enumerate(params):
        if i < len(args):
            val = args[i]
        elif name in kwargs:
            val = kwargs[name]
        elif default is not inspect.Parameter.empty:
            val = default
        else:
            raise TypeError(f"{key}: no value for {name}")
        if const:
            signature.append((name, "constexpr"))
            constexprs.append((name, val))
            continue
        ty, spec = native_specialize_impl(backend, val, False, specialize, align)
        signature.append((name, ty))
        if ty == "constexpr":
            constexprs.append((name, spec))
        elif isinstance(spec, str) and spec:
            attrs.append((name, tuple(tuple(a) for a in backend.parse_attr(spec))))
    return Case(key, tuple(signature), tuple(constexprs), tuple(attrs), tuple(sorted(options.items())))
