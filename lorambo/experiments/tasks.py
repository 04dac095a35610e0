"""The two tasks on the real all-MiniLM-L6-v2: data, loss, evaluation, and task-specific metrics.

- :class:`PlantedTask`: distil the pretrained model plus planted low-rank deltas
  (``planted.py``) on real English text, Python's standard-library docstrings
  (``text_corpus.py``) or, with ``planted_text="snippets"``, NYT editorials and Amazon reviews
  (``snippet_text.py``), cut into windows of ``max_length`` tokens; a validation or test window
  that repeats a window of an earlier split verbatim is dropped. The loss is the MSE of the final
  token hidden states against the target's (cached once), divided by the pretrained model's own
  MSE on the training windows: 0.0 = deltas recovered, 1.0 = the pretrained model on the training
  windows. On the validation and test windows the pretrained model scores other values
  (``pretrained``, measured: the baseline a run is compared with).
- :class:`SentimentTask`: binary sentiment of Rotten Tomatoes sentences (``sentiment_data.py``:
  the sign of their human-rated valence) with a linear head on the mean-pooled embedding plus
  LoRA. Every run uses the same linear-probe head (trained on the frozen encoder on the
  training split, early stopped on validation), a baseline reported on its own; the head stays
  frozen, so every method trains its LoRA parameters only.

Shared protocol: the data splits are fixed; the run seed picks the LoRA initialisation and the
order of training batches, identically for every method. The student runs in eval mode (no
dropout) so that every method sees the same deterministic function of its weights.
"""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from lorambo.experiments import planted as pl
from lorambo.experiments.student import Student, dims_of, fresh_student, short, target_names


def _rows(data: dict, idx) -> dict:
    """Rows ``idx`` of every tensor; token columns past the longest sequence of the selection are
    cut (right padding only: outputs at real tokens are unchanged, compute drops)."""
    out = {k: v[idx] for k, v in data.items()}
    mask = out.get("attention_mask")
    if mask is not None and mask.ndim == 2 and mask.shape[0] > 0:
        longest = int(mask.sum(1).max())
        if longest < mask.shape[1]:
            for k, v in out.items():
                if v.ndim >= 2 and v.shape[1] == mask.shape[1] and k != "target":
                    out[k] = v[:, :longest]
            if "target" in out:
                out["target"] = out["target"][:, :longest]
    return out


def _size(data: dict) -> int:
    return next(iter(data.values())).shape[0]


class Task:
    name = ""
    metric = ""             # the reported metric's key in evaluate()
    higher_is_better = False

    def __init__(self, bert, tokenizer, cfg):
        self.bert, self.tokenizer, self.cfg = bert.eval(), tokenizer, cfg
        self.device = next(bert.parameters()).device
        self.names = target_names(bert)           # Student-level module names
        self.dims = dims_of(bert)                 # {short name: (d, k)}
        self.head = None
        self.splits: dict[str, dict] = {}

    # -------------------------------------------------------------------------------- data
    def train_batches(self, seed: int, steps: int, batch_size: int) -> list[dict]:
        """The training stream of a seed: the same for every method."""
        n = _size(self.splits["train"])
        rng = random.Random(seed)
        order: list[int] = []
        out = []
        for _ in range(steps):
            if len(order) < batch_size:
                fresh = list(range(n))
                rng.shuffle(fresh)
                order += fresh
            idx, order = order[:batch_size], order[batch_size:]
            out.append(_rows(self.splits["train"], torch.tensor(idx, device=self.device)))
        return out

    def eva_batches(self, batches: int, batch_size: int = 32) -> list[dict]:
        """Fixed training rows for EVA's SVD of the layer inputs (data only, the same for all seeds)."""
        train = self.splits["train"]
        n = min(batches * batch_size, _size(train))
        return [_rows(train, slice(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]

    def heldout_batches(self, examples: int) -> list[dict]:
        """One validation batch of ``examples`` rows (ALoRA's ablation scores; never the test split).
        One batch, because ablation evaluates it 2 + 2 x (number of components) times."""
        val = self.splits["val"]
        return [_rows(val, slice(0, min(examples, _size(val))))]

    def _cap_train(self) -> None:
        """Keep the first ``train_examples`` training rows (already in a fixed shuffled order) and
        the first ``eval_examples`` validation rows: targets are computed only for what is used."""
        for split, cap in (("train", self.cfg.train_examples), ("val", self.cfg.eval_examples)):
            if cap and _size(self.splits[split]) > cap:
                self.splits[split] = _rows(self.splits[split], slice(0, cap))

    def eval_split(self, split: str) -> dict:
        return self.splits[split]

    def fresh_student(self, seed: int) -> Student:
        return fresh_student(self.bert, self.head, seed)

    # ------------------------------------------------------------------------- to override
    def loss(self, model, batch) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model, split: str, chunk: int = 256) -> dict:
        raise NotImplementedError

    def extra_metrics(self, ranks: dict[str, int]) -> dict:
        return {}

    def describe(self) -> dict:
        return {"sizes": {k: _size(v) for k, v in self.splits.items()}}


TEXT_LABELS = {"docstrings": "Python standard-library docstring paragraphs",
               "snippets": "NYT editorials and Amazon reviews (Hutto & Gilbert, ICWSM 2014)"}


def planted_text(name: str) -> list[str]:
    """The planted task's documents, in a fixed order (``cfg.planted_text``)."""
    if name == "docstrings":
        from lorambo.experiments.text_corpus import stdlib_paragraphs

        return stdlib_paragraphs()
    if name == "snippets":
        from lorambo.experiments.snippet_text import snippet_documents

        return snippet_documents()
    raise ValueError(f"unknown planted_text {name!r}; valid: {', '.join(TEXT_LABELS)}")


def document_splits(documents: list[str]) -> dict[str, list[str]]:
    """70/15/15 of a fixed shuffle (seed 0), by document: no document spans two splits."""
    docs = list(documents)
    random.Random(0).shuffle(docs)
    n = len(docs)
    cut = (int(0.7 * n), int(0.85 * n))
    return {"train": docs[:cut[0]], "val": docs[cut[0]:cut[1]], "test": docs[cut[1]:]}


def token_windows(tokenizer, documents: list[str], max_length: int) -> list[list[int]]:
    """Each document cut into consecutive ``[CLS] + (max_length - 2) tokens + [SEP]`` windows; a
    shorter rest is dropped (every window is full: no padding)."""
    width = max_length - 2
    rows = []
    for text in documents:
        ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]  # long texts are cut here
        for i in range(0, len(ids) - width + 1, width):
            rows.append([tokenizer.cls_token_id] + ids[i:i + width] + [tokenizer.sep_token_id])
    return rows


def disjoint_windows(windows: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Drop from each split the windows an earlier split (train, then validation) already holds:
    different documents can share a token window verbatim (docstrings repeat phrases), and a
    test window seen in training would be scored as held out."""
    seen: set[tuple[int, ...]] = set()
    out = {}
    for split, rows in windows.items():
        out[split] = [r for r in rows if tuple(r) not in seen]
        seen.update(tuple(r) for r in rows)
    return out


class PlantedTask(Task):
    name = "planted"
    metric = "rel_loss"
    higher_is_better = False

    def __init__(self, bert, tokenizer, cfg, planted: dict[str, int] | None = None):
        super().__init__(bert, tokenizer, cfg)
        self.planted = dict(planted or pl.PLANTED_RANKS)
        parts = document_splits(planted_text(cfg.planted_text))
        windows = disjoint_windows({k: token_windows(self.tokenizer, v, cfg.max_length) for k, v in parts.items()})
        self.splits = {k: self._tensors(v) for k, v in windows.items()}
        self._cap_train()
        self.directions = pl.make_directions(self.dims, self.planted)
        calib = _rows(self.splits["train"], slice(0, 64))
        self.coefs = pl.calibrate(self.bert, self.directions, calib, cfg.planted_scale)
        self.teacher = pl.make_teacher(self.bert, pl.deltas(self.directions, self.coefs))
        for split in self.splits.values():
            split["target"] = self._forward(self.teacher, split)
        base = self._forward(self.bert, self.splits["train"])
        self.norm = float((base - self.splits["train"]["target"]).pow(2).mean())
        del self.teacher  # the cached targets are all that is needed
        self.pretrained = {k: float((self._forward(self.bert, v) - v["target"]).pow(2).mean()) / self.norm
                           for k, v in self.splits.items()}  # rel_loss of the model without LoRA, per split

    def _tensors(self, rows: list[list[int]]) -> dict:
        if not rows:
            raise RuntimeError("no text windows: max_length is longer than every paragraph")
        random.Random(1).shuffle(rows)
        ids = torch.tensor(rows, device=self.device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    @torch.no_grad()
    def _forward(self, bert, data, chunk: int = 128) -> torch.Tensor:
        out = []
        for i in range(0, _size(data), chunk):
            b = _rows(data, slice(i, i + chunk))
            out.append(bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state)
        return torch.cat(out)

    def loss(self, model, batch) -> torch.Tensor:
        return F.mse_loss(model(batch), batch["target"]) / self.norm

    @torch.no_grad()
    def evaluate(self, model, split: str, chunk: int = 256) -> dict:
        data = self.eval_split(split)
        total, n = 0.0, _size(data)
        for i in range(0, n, chunk):
            b = _rows(data, slice(i, i + chunk))
            total += float(self.loss(model, b)) * _size(b)
        return {"rel_loss": total / n}

    def extra_metrics(self, ranks: dict[str, int]) -> dict:
        return pl.recovery(ranks, self.dims, self.planted)

    def describe(self) -> dict:
        return {**super().describe(), "text": TEXT_LABELS[self.cfg.planted_text],
                "planted_ranks": self.planted, "coefficients": self.coefs, "scale": self.cfg.planted_scale,
                "pretrained_rel_loss": self.pretrained,
                "planted_params": sum(r * sum(self.dims[n]) for n, r in self.planted.items())}


class SentimentTask(Task):
    """Positive vs negative movie-review sentences; splits 80/10/10 of a fixed shuffle."""

    name = "sentiment"
    metric = "accuracy"
    higher_is_better = True
    classes = ("negative", "positive")

    def __init__(self, bert, tokenizer, cfg, path=None):
        super().__init__(bert, tokenizer, cfg)
        from lorambo.experiments.sentiment_data import load_sentences

        rows = load_sentences(path)
        random.Random(0).shuffle(rows)
        n = len(rows)
        cut = (int(0.8 * n), int(0.9 * n))
        parts = {"train": rows[:cut[0]], "val": rows[cut[0]:cut[1]], "test": rows[cut[1]:]}
        self.splits = {k: self._encode(v) for k, v in parts.items()}
        self._cap_train()
        self.head, self.probe = self._linear_probe()

    def _encode(self, rows) -> dict:
        enc = self.tokenizer([u.text for u in rows], padding="max_length", truncation=True,
                             max_length=self.cfg.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device),
                "labels": torch.tensor([u.label for u in rows], device=self.device)}

    def _linear_probe(self, steps: int = 300, lr: float = 1e-2):
        """A linear head on the frozen mean-pooled embeddings: full-batch AdamW on train, early
        stopped at the lowest validation loss. Without the stop it fits the training split
        almost perfectly (loss ~0.004), leaving LoRA no training signal to work with."""
        import copy

        from lorambo.experiments.minilm import mean_pool

        feats = {}
        with torch.no_grad():
            for k, data in self.splits.items():
                h = self.bert(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).last_hidden_state
                feats[k] = mean_pool(h, data["attention_mask"])
        labels = {k: v["labels"] for k, v in self.splits.items()}
        torch.manual_seed(0)
        head = torch.nn.Linear(feats["train"].shape[1], len(self.classes)).to(self.device)
        opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
        best, best_loss, self.probe_steps = copy.deepcopy(head), float("inf"), 0
        for step in range(1, steps + 1):
            loss = F.cross_entropy(head(feats["train"]), labels["train"])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                val = float(F.cross_entropy(head(feats["val"]), labels["val"]))
            if val < best_loss:
                best, best_loss, self.probe_steps = copy.deepcopy(head), val, step
        with torch.no_grad():
            probe = {k: float((best(f).argmax(1) == labels[k]).float().mean()) for k, f in feats.items()}
            probe["train_loss"] = float(F.cross_entropy(best(feats["train"]), labels["train"]))
        return best.requires_grad_(False), probe

    def loss(self, model, batch) -> torch.Tensor:
        return F.cross_entropy(model(batch), batch["labels"])

    @torch.no_grad()
    def evaluate(self, model, split: str, chunk: int = 256) -> dict:
        data = self.eval_split(split)
        n, correct, total = _size(data), 0, 0.0
        for i in range(0, n, chunk):
            b = _rows(data, slice(i, i + chunk))
            logits = model(b)
            total += float(F.cross_entropy(logits, b["labels"], reduction="sum"))
            correct += int((logits.argmax(1) == b["labels"]).sum())
        return {"accuracy": correct / n, "loss": total / n}

    def describe(self) -> dict:
        return {**super().describe(),
                "dataset": "Rotten Tomatoes sentences rated by humans (Hutto & Gilbert, ICWSM 2014), from the "
                           "vaderSentiment 3.3.2 sdist (MIT licence)",
                "classes": list(self.classes), "class_counts": self.class_counts(),
                "linear_probe": self.probe, "linear_probe_steps": self.probe_steps}

    def class_counts(self) -> dict[str, dict[str, int]]:
        """``{split: {class: sentences}}`` of the splits as used (after the caps): accuracy is read
        against the majority class's share."""
        return {k: {c: int((v["labels"] == i).sum()) for i, c in enumerate(self.classes)}
                for k, v in self.splits.items()}


def make_task(name: str, bert, tokenizer, cfg) -> Task:
    if name == "planted":
        return PlantedTask(bert, tokenizer, cfg)
    if name == "sentiment":
        return SentimentTask(bert, tokenizer, cfg)
    raise ValueError(f"unknown task {name!r}")


__all__ = ["Task", "PlantedTask", "SentimentTask", "make_task", "short"]
