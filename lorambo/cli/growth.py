"""``lorambo demo --growth``: LoRA with mixed ranks on the real all-MiniLM-L6-v2, ranks grown mid-training.

Task: contrastive sentence-embedding training (in-batch InfoNCE, as sentence-transformers
trains this model) on real English prose: each standard-library docstring paragraph is split in
halves, and the two halves must find each other among the batch. A fixed held-out set of
paragraphs measures the loss. Halfway through, the ranks of the last two transformer blocks are
doubled in place; the demo then proves that the model computed exactly the same function right
after the growth, and that no parameter storage moved or grew.
"""

from __future__ import annotations

import random
import sys
import time

import torch
from tqdm.auto import tqdm

from lorambo.experiments.minilm import embed, load_minilm
from lorambo.experiments.text_corpus import split_halves, stdlib_paragraphs
from lorambo.model import configure_model, lora_layers
from lorambo.optim import AdamW

# Mixed ranks per module type: where sentence-embedding LoRA usually helps most gets more.
DEMO_RANKS = {"query": 4, "key": 2, "value": 4, "attention.output.dense": 2,
              "intermediate.dense": 8, "output.dense": 4}
FP32_ROUNDING = 1e-6  # unit-norm embeddings: adding zero-B slots may only reorder float32 sums
TEMPERATURE = 0.05  # sentence-transformers' MultipleNegativesRankingLoss default scale is 20


def _rank_for(name: str) -> int:
    for suffix, rank in DEMO_RANKS.items():  # attention.output.dense is tried before output.dense
        if name.endswith(suffix):
            return rank
    raise KeyError(name)


def contrastive_loss(model, tokenizer, paragraphs: list[str]) -> torch.Tensor:
    firsts, seconds = zip(*(split_halves(p) for p in paragraphs))
    a, b = embed(model, tokenizer, list(firsts)), embed(model, tokenizer, list(seconds))
    logits = a @ b.t() / TEMPERATURE  # (B, B): the diagonal holds the true pairs
    target = torch.arange(len(paragraphs))
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                  + torch.nn.functional.cross_entropy(logits.t(), target))


def _storage_fingerprint(model) -> dict[str, tuple[int, int, int]]:
    return {name: (id(p), p.data_ptr(), p.untyped_storage().nbytes()) for name, p in model.named_parameters()}


def _grow_last_blocks(model, optimizer) -> list[tuple[str, int, int]]:
    grown = []
    for name, layer in lora_layers(model).items():
        if ".layer.4." in name or ".layer.5." in name:
            new = min(2 * layer.rank, layer.capacity)
            old = layer.set_rank(new, optimizer=optimizer)
            grown.append((name, old, new))
    return grown


def _table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


HELD_OUT = 64  # paragraphs kept aside for the held-out loss


def check_growth_args(steps: int, grow_at: int, batch_size: int, paragraphs: int | None = None) -> None:
    """``ValueError`` naming the option unless the schedule and batch size can run: growth inside
    the run, and 2 to (training paragraphs) paragraphs per step (the loss contrasts a batch's
    paragraphs with each other, drawn without replacement)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"--steps {steps} must be a whole number >= 2 (growth happens inside the run)")
    if isinstance(grow_at, bool) or not isinstance(grow_at, int) or not 0 < grow_at < steps:
        raise ValueError(f"--grow-at {grow_at} must be inside (0, --steps {steps})")
    available = (len(stdlib_paragraphs()) if paragraphs is None else paragraphs) - HELD_OUT
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 2 <= batch_size <= available:
        raise ValueError(f"--batch-size {batch_size} must be between 2 and {available} "
                         "(the training paragraphs available; a batch contrasts at least two)")


def run_growth_demo(steps: int = 24, grow_at: int = 12, batch_size: int = 16, seed: int = 0, lr: float = 3e-4) -> dict:
    """Run the demo, print its tables and return every number (``ok`` says whether all checks held)."""
    paragraphs = stdlib_paragraphs()
    check_growth_args(steps, grow_at, batch_size, len(paragraphs))
    torch.manual_seed(seed)
    started = time.perf_counter()
    model, tokenizer = load_minilm()
    rng = random.Random(seed)
    rng.shuffle(paragraphs)
    held_out, train = paragraphs[:HELD_OUT], paragraphs[HELD_OUT:]
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "pooler" not in n]
    configure_model(model, {n: _rank_for(n) for n in targets}, dropout=0.05)
    layers = lora_layers(model)
    optimizer = AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    print(f"all-MiniLM-L6-v2 with {len(layers)} LoRAMBoLinear layers, "
          f"{sum(l.rank for l in layers.values())} ranks in total; "
          f"{len(train)} training / {len(held_out)} held-out paragraphs of Python's docstrings")

    def held_out_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = contrastive_loss(model, tokenizer, held_out)
        model.train()
        return float(loss)

    history = [(0, held_out_loss())]
    growth: dict[str, object] = {}
    model.train()
    bar = tqdm(range(1, steps + 1), desc="training", unit="step", file=sys.stderr, disable=None)
    for step in bar:
        batch = rng.sample(train, batch_size)
        loss = contrastive_loss(model, tokenizer, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step == grow_at:
            growth = _check_growth(model, tokenizer, held_out[:16], optimizer)
            history.append((step, held_out_loss()))
    bar.close()
    history.append((steps, held_out_loss()))

    print("\nHeld-out contrastive loss (64 paragraphs):")
    print(_table([(f"step {s}", f"{v:.4f}") for s, v in history]))
    print(f"\nRank growth at step {grow_at}: {len(growth['grown'])} layers in blocks 4-5 doubled "
          f"their rank ({growth['ranks_before']} -> {growth['ranks_after']} ranks in the model)")
    print(_table([
        ("function preserved (max |Δ embedding|)", f"{growth['max_abs_diff']:.3e}"),
        ("same Parameter objects", f"{growth['same_objects']}"),
        ("same data_ptr and storage bytes", f"{growth['same_storage']}"),
        ("parameter storage (MiB) before / after", f"{growth['mib_before']:.3f} / {growth['mib_after']:.3f}"),
        ("inactive slots exactly zero", f"{growth['inactive_zero']}"),
    ]))
    ok = growth["max_abs_diff"] <= FP32_ROUNDING and growth["same_objects"] and growth["same_storage"] and growth["inactive_zero"]
    ok = ok and history[-1][1] < history[0][1]
    print(f"\n{'OK' if ok else 'FAILED'}: held-out loss {history[0][1]:.4f} -> {history[-1][1]:.4f} "
          f"in {time.perf_counter() - started:.1f} s")
    return {"ok": ok, "history": history, "growth": growth}


def _check_growth(model, tokenizer, probe: list[str], optimizer) -> dict:
    layers = lora_layers(model)
    before = _storage_fingerprint(model)
    ranks_before = sum(l.rank for l in layers.values())
    model.eval()
    with torch.no_grad():
        emb_before = embed(model, tokenizer, probe)
        grown = _grow_last_blocks(model, optimizer)
        emb_after = embed(model, tokenizer, probe)
    model.train()
    after = _storage_fingerprint(model)
    inactive_zero = all(bool((l.lora_A[l.rank:] == 0).all() and (l.lora_B[:, l.rank:] == 0).all())
                        for l in layers.values())
    return {
        "grown": grown,
        "ranks_before": ranks_before,
        "ranks_after": sum(l.rank for l in layers.values()),
        "max_abs_diff": float((emb_after - emb_before).abs().max()),
        "same_objects": all(before[n][0] == after[n][0] for n in before) and before.keys() == after.keys(),
        "same_storage": all(before[n][1:] == after[n][1:] for n in before),
        "mib_before": sum(v[2] for v in before.values()) / 2**20,
        "mib_after": sum(v[2] for v in after.values()) / 2**20,
        "inactive_zero": inactive_zero,
    }
