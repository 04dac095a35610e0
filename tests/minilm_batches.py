"""Real padded Hugging Face batches of all-MiniLM-L6-v2 for the padding-invariance tests."""

import torch

TEXTS = ["A man is playing a guitar on the stage tonight.", "Shares dropped.",
         "The quick brown fox jumps over the lazy dog.", "Dinner is ready."]


def load(dtype=torch.float32):
    """(model in eval mode, tokenizer)."""
    from lorambo.experiments.minilm import load_minilm

    model, tokenizer = load_minilm(dtype)
    return model.eval(), tokenizer


def encode(tokenizer, texts, side="right", length=None):
    """A dict batch of ``texts`` padded on ``side`` to the longest (or to ``length``)."""
    tokenizer.padding_side = side
    try:
        padding = True if length is None else "max_length"
        batch = dict(tokenizer(list(texts), padding=padding, max_length=length, return_tensors="pt"))
    finally:
        tokenizer.padding_side = "right"
    # BERT's absolute positions must count real tokens only, or left padding shifts them
    batch["position_ids"] = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)
    return batch


# token_mask values every consumer must refuse, with the message it gives, for TEXTS encoded to
# [4, 13]: a bad setting, a mask that is not [batch, tokens], one that does not match the layer
BAD_TOKEN_MASKS = [
    ("attention", "token_mask must be 'auto'"),
    (lambda batch: batch["attention_mask"][0], r"\[batch, tokens\] tensor, got \(13,\)"),
    (lambda batch: batch["attention_mask"][:, :3], r"'encoder.layer.0.attention.self.query' gets an input "
                                                   r"of shape \(4, 13, 384\).*\(4, 3\)"),
]
