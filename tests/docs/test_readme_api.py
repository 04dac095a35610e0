"""The API reference (the README's overview and the pages under docs/) names what exists: every
``lorambo.*`` name resolves, every ``name(arg=...)`` a page shows for a lorambo callable uses
parameters that callable has (with the stated default, where the span is a signature), a full
signature lists every parameter, and every ``LORAMBO_*`` variable is read somewhere. The README
names every public name. Parsing only, no models: fast."""

import ast
import importlib
import inspect
import re
from pathlib import Path

import pytest
import torch

import lorambo
import lorambo.integrations.fsdp as fsdp
import lorambo.nn
import lorambo.sensitivity
from lorambo.allocation.alora import ALoRAConfig
from lorambo.integrations import LoRAMBoCallback
from test_readme_blocks import PAGES, REFERENCE

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
# The README and every page under docs/ (the reference the README's API overview links to).
PAGES = {page: (ROOT / page).read_text(encoding="utf-8") for page in PAGES}


def spans_of(text: str) -> list[str]:
    """Inline code spans outside fenced blocks, and the one-line Python blocks (call signatures;
    the longer blocks run in test_readme_blocks.py)."""
    return (re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
            + re.findall(r"^```python\n([^\n]+)\n```", text, flags=re.M))


PAGE_SPANS = [(page, span) for page, text in PAGES.items() for span in spans_of(text)]
SPANS = spans_of(README)
TORCH_METHODS = set(vars(torch.nn.Module)) | set(vars(torch.optim.Optimizer))
CALL = re.compile(r"^([A-Za-z_][\w.]*)\((.*)\)$")
NAMESPACES = (lorambo, lorambo.sensitivity, lorambo.nn, fsdp)
CLASSES = (lorambo.LoRAMBoLinear, lorambo.LoRAMBoOptimizer, lorambo.optim.AdamW,
           lorambo.sensitivity.FisherProxy, lorambo.sensitivity.AdaLoRAImportance, LoRAMBoCallback)


def candidates(head: str) -> list:
    """The lorambo callables a span's head may mean (``layer.set_rank``: the method, and
    ``lorambo.integrations.fsdp.set_rank``); empty for other libraries' names."""
    name = head.rsplit(".", 1)[-1]
    found = [getattr(ns, name) for ns in NAMESPACES if name in getattr(ns, "__all__", ())]
    # methods a class adds or overrides, not those torch's nn.Module / Optimizer documents: a bare
    # `load_state_dict(...)` means torch's (LoRAMBoOptimizer's has torch's name, not its arguments)
    found += [getattr(cls, name) for cls in CLASSES if name in vars(cls) and name not in TORCH_METHODS
              and not any(name in vars(base) for base in cls.__mro__[1:] if base.__module__.startswith("torch"))]
    found += [cls for cls in CLASSES + (ALoRAConfig,) if cls.__name__ == name]
    return [f for f in found if callable(f)]


def parse_args(text: str):
    """``(positional names, {keyword: source of its value}, has '...')`` of an argument list, or
    None when it is not Python (prose between backticks)."""
    try:
        call = ast.parse(f"f({text.replace('...', 'Ellipsis')})", mode="eval").body
    except SyntaxError:
        return None
    positional = [a.id if isinstance(a, ast.Name) else None for a in call.args]
    keywords = {k.arg: ast.unparse(k.value) for k in call.keywords if k.arg is not None}
    return positional, keywords, "..." in text or "Ellipsis" in positional


def parameters(func) -> dict:
    params = dict(inspect.signature(func).parameters)
    params.pop("self", None)
    return params


def literal(source: str):
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError):
        return False, None


def calls(spans=PAGE_SPANS):
    """Every span that calls a lorambo callable: (page, span, head, positional, keywords, elided)."""
    out = []
    for page, span in spans:
        match = CALL.match(span.strip())
        if match and candidates(match.group(1)):
            parsed = parse_args(match.group(2))
            if parsed is not None:
                out.append((page, span, match.group(1), *parsed))
    return out


def is_signature(func, positional, keywords, elided) -> bool:
    """A signature, not a usage example: every value a literal, nothing elided, and the required
    parameters all named positionally: ``set_rank(r, optimizer=None)``, not ``unload(merge=True)``."""
    params = parameters(func).values()
    required = [p for p in params if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return not elided and all(literal(s)[0] for s in keywords.values()) and len(positional) >= len(required)


def problems_with(func, positional, keywords, elided) -> list[str]:
    params = parameters(func)
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    signature = is_signature(func, positional, keywords, elided)
    found = []
    for key, source in keywords.items():
        if key not in params:
            if not accepts_any:
                found.append(f"no parameter {key!r}")
            continue
        is_literal, value = literal(source)
        default = params[key].default
        if signature and is_literal and default is not inspect.Parameter.empty and value != default:
            found.append(f"{key}={source} but the default is {default!r}")
        if signature and default is inspect.Parameter.empty and params[key].kind is not params[key].VAR_KEYWORD:
            found.append(f"{key}={source} but {key!r} has no default")
    if signature and keywords:
        # every parameter after the positional ones the span lists must appear in it
        rest = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)][len(positional):]
        missing = [n for n in rest if n not in keywords]
        if missing:
            found.append(f"signature leaves out {missing}")
    return found


def test_the_pages_show_signatures():
    heads = {head.rsplit(".", 1)[-1] for _, _, head, *_ in calls()}
    assert {"LoRAMBoLinear", "configure_model", "allocate", "hessian_trace", "FisherProxy"} <= heads
    readme = {head.rsplit(".", 1)[-1] for _, _, head, *_ in calls([("README.md", s) for s in SPANS])}
    assert {"LoRAMBoLinear", "configure_model", "allocate", "hessian_trace", "FisherProxy"} <= readme
    # every page of the reference shows calls that are checked here
    for page in REFERENCE[1:-2]:
        assert any(p == page for p, *_ in calls()), page


def test_the_readme_links_every_reference_page():
    assert not [page for page in REFERENCE[1:] if f"]({page}" not in README]


@pytest.mark.parametrize("page, span, head, positional, keywords, elided", calls(), ids=lambda v: str(v)[:60])
def test_every_shown_call_fits_its_callable(page, span, head, positional, keywords, elided):
    funcs = candidates(head)
    # a span that reads as the signature of one of them must match that one in full
    funcs = [f for f in funcs if is_signature(f, positional, keywords, elided)] or funcs
    reports = [problems_with(f, positional, keywords, elided) for f in funcs]
    assert any(not r for r in reports), f"{page} `{span}`: {reports}"


def resolve(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("page", sorted(PAGES))
def test_every_lorambo_name_resolves(page):
    names = {m for p, span in PAGE_SPANS if p == page for m in re.findall(r"\blorambo(?:\.[A-Za-z_]\w*)+", span)}
    assert page != "README.md" or len(names) > 10
    broken = []
    for name in sorted(n for n in names if not n.endswith((".py", ".md", ".pt"))):
        try:
            resolve(name)
        except (ImportError, AttributeError) as error:
            broken.append(f"{name}: {error}")
    assert not broken, broken


def test_every_environment_variable_is_read():
    variables = {v for page in REFERENCE for v in re.findall(r"\bLORAMBO_[A-Z_]+\b", PAGES[page])}
    assert "LORAMBO_BACKEND" in re.findall(r"\bLORAMBO_[A-Z_]+\b", README)
    source = "".join(p.read_text(encoding="utf-8") for folder in ("lorambo", "kernels", "setup.py")
                     for p in ([ROOT / folder] if folder.endswith(".py") else (ROOT / folder).rglob("*.py")))
    assert not [v for v in variables if f'"{v}"' not in source and f"'{v}'" not in source]


def names_in_code(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z_]\w*", " ".join(spans_of(text) + re.findall(r"^```python\n(.*?)^```", text,
                                                                               flags=re.S | re.M))))


@pytest.mark.parametrize("module", [lorambo, lorambo.sensitivity, lorambo.optim, lorambo.nn, fsdp],
                         ids=lambda m: m.__name__)
def test_every_public_name_is_documented(module):
    """What ``__all__`` exports is in the README's API overview, in a code span, and in the
    reference pages under docs/ (the full reference for users)."""
    assert not [n for n in module.__all__ if n not in names_in_code(README)]
    in_pages = set().union(*(names_in_code(text) for page, text in PAGES.items() if page != "README.md"))
    assert not [n for n in module.__all__ if n not in in_pages]
