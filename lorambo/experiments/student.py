"""The model every method trains: all-MiniLM-L6-v2 plus, for classification, a linear head.

``Student(batch)`` maps a batch dict (``input_ids``, ``attention_mask``) to the token hidden
states [B, T, 384] (no head) or class logits [B, C] (head on the mean-pooled embedding). LoRA
goes into all 36 linear layers of the encoder (query, key, value, attention output, intermediate,
output of each of the 6 blocks); the pooler is not used.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lorambo.experiments.minilm import mean_pool

PREFIX = "bert.encoder."  # module names inside Student; results drop it ("layer.3.output.dense")
MODULE_TYPES = ("attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense")


class Student(nn.Module):
    def __init__(self, bert: nn.Module, head: nn.Module | None = None):
        super().__init__()
        self.bert = bert
        self.head = head

    def forward(self, batch) -> torch.Tensor:
        hidden = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        if self.head is None:
            return hidden
        return self.head(mean_pool(hidden, batch["attention_mask"]))


def target_names(bert: nn.Module) -> list[str]:
    """Student-level names of the 36 adapted linear layers, in block order."""
    blocks = len(bert.encoder.layer)
    return [f"{PREFIX}layer.{i}.{t}" for i in range(blocks) for t in MODULE_TYPES]


def short(name: str) -> str:
    """``bert.encoder.layer.3.output.dense`` -> ``layer.3.output.dense`` (peft prefixes dropped too)."""
    i = name.find("layer.")
    return name[i:] if i >= 0 else name


def dims_of(bert: nn.Module) -> dict[str, tuple[int, int]]:
    """``{short name: (out_features d, in_features k)}``; one rank costs d + k parameters."""
    student = Student(bert)
    out = {}
    for name in target_names(bert):
        layer = student.get_submodule(name)
        out[short(name)] = (layer.out_features, layer.in_features)
    return out


def fresh_student(bert: nn.Module, head: nn.Module | None, seed: int) -> Student:
    """A deep copy of the pretrained encoder (and head), every parameter frozen: every run starts from
    the same weights, and a method trains only the LoRA parameters it adds (the head stays the
    task's linear probe for every method)."""
    torch.manual_seed(seed)
    student = Student(copy.deepcopy(bert), copy.deepcopy(head) if head is not None else None)
    for p in student.parameters():
        p.requires_grad_(False)
    return student

