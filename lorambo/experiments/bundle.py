"""A self-contained folder of everything the experiment reads, for a machine without the model
package, the data cache or a network: ``gpu_bundle/`` (see docs/gpu_experiment.md).

Layout, relative to the bundle:

- ``model/``: all-MiniLM-L6-v2's ``config.json``, tokenizer files and ``model.safetensors`` with
  its weights in fp16 (half the size); :func:`lorambo.experiments.minilm.load_minilm` casts them
  back to the experiment's dtype;
- ``vader/``: the rated movie-review sentences (sentiment task), the NYT editorial and Amazon
  review snippets (the planted task's longer text), the dataset's README and licence;
- ``manifest.json``: ``{"files": {path: {"sha256", "size"}}}`` for every other file.

A bundle is used when ``LORAMBO_BUNDLE`` names it (``lorambo experiment --bundle DIR`` sets it,
and worker processes inherit it). Every file is checked against the manifest before it is read;
a missing or altered file is an error naming it. ``bundle_build.py`` writes bundles:
``python -m lorambo.experiments.bundle build DIR`` (``make gpu-bundle``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

ENV = "LORAMBO_BUNDLE"
MANIFEST = "manifest.json"
MODEL_DIR = "model"
DATA_DIR = "vader"
FORMAT = 1


def active() -> Path | None:
    """The bundle named by ``LORAMBO_BUNDLE``, or None (read the installed package and cache)."""
    value = os.environ.get(ENV)
    if not value:
        return None
    if not (Path(value) / MANIFEST).is_file():  # a variable left set from another shell, say
        raise FileNotFoundError(f"${ENV}={value!r} names no bundle (no {MANIFEST} there): unset {ENV} to read "
                                "the installed model package and data cache, or build one with `make gpu-bundle`")
    return Path(value)


def use(root) -> Path:
    """Make ``root`` the active bundle for this process and the processes it starts."""
    root = Path(root).resolve()
    manifest(root)  # fails now, naming the folder, rather than minutes later in a loader
    os.environ[ENV] = str(root)
    return root


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def manifest(root) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"bundle {root}: no {MANIFEST}; build one with `make gpu-bundle` "
                                f"(python -m lorambo.experiments.bundle build {root})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ValueError(f"bundle {root}: {MANIFEST} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("files"), dict):
        raise ValueError(f"bundle {root}: {MANIFEST} is not a format-{FORMAT} bundle manifest")
    for name, entry in data["files"].items():  # checked here: check_file reads both keys
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int)
                and isinstance(entry.get("sha256"), str)):
            raise ValueError(f"bundle {root}: {MANIFEST} entry {name!r} is not {{\"sha256\": text, \"size\": "
                             f"integer}} (got {entry!r}): rebuild with `make gpu-bundle`")
    return data


def check_file(root, name: str, entry: dict | None = None) -> Path:
    """``root/name`` after its size and sha256 matched the manifest (hashed on every call: each
    process reads a file once, and 46 MiB hash in a fraction of a second)."""
    root = Path(root)
    if entry is None:
        entry = manifest(root)["files"].get(name)
        if entry is None:
            raise FileNotFoundError(f"bundle {root}: {name} is not in its {MANIFEST}; rebuild with `make gpu-bundle`")
    path = root / name
    if not path.is_file():
        raise FileNotFoundError(f"bundle {root}: {name} is missing (listed in {MANIFEST}); rebuild with "
                                "`make gpu-bundle` or copy the whole folder again")
    size = path.stat().st_size
    if size != entry["size"] or sha256(path) != entry["sha256"]:
        raise ValueError(f"bundle {root}: {name} does not match its {MANIFEST} (size {size}, expected "
                         f"{entry['size']}; or a different sha256): the file was altered or truncated, rebuild "
                         "with `make gpu-bundle`")
    return path


def verify(root) -> dict:
    """Check every file of the manifest; returns the manifest."""
    data = manifest(root)
    for name, entry in data["files"].items():
        check_file(root, name, entry)
    return data


def model_dir(root) -> Path:
    """The verified ``model/`` folder (every file of it checked)."""
    data = manifest(root)
    names = [n for n in data["files"] if n.startswith(MODEL_DIR + "/")]
    if not names:
        raise FileNotFoundError(f"bundle {root}: its {MANIFEST} lists no {MODEL_DIR}/ files")
    for name in names:
        check_file(root, name, data["files"][name])
    return Path(root) / MODEL_DIR


def data_file(root, file_name: str) -> Path:
    """A verified file of ``vader/``."""
    return check_file(root, f"{DATA_DIR}/{file_name}")


def main(argv: list[str] | None = None) -> int:
    """``build DIR`` writes a bundle, ``verify DIR`` checks one."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in ("build", "verify"):
        print("usage: python -m lorambo.experiments.bundle {build,verify} DIR", file=sys.stderr)
        return 2
    try:
        if args[0] == "build":
            from lorambo.experiments.bundle_build import build, describe

            print(describe(args[1], build(args[1])))
        else:
            print(f"bundle {args[1]}: {len(verify(args[1])['files'])} files match {MANIFEST}")
    except (ValueError, OSError, ImportError) as err:
        print(f"lorambo.experiments.bundle {args[0]}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
