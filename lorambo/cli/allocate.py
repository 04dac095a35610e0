"""``lorambo allocate``: per-layer LoRA ranks for a local transformers model, for peft users.

    lorambo allocate --model PATH --budget N --method gradient --data FILE --out DIR

Writes into DIR (atomically: each file to a temporary name first, then all renamed; a failure,
e.g. a full disk, leaves every file of an earlier run as it was):

- ``ranks.json``: ranks, pool capacities, sensitivities, budget, method (the sensitivity; null
  with ``--allocation uniform`` / ``alora``, which measure nothing);
- ``adapter_config.json``: a peft ``LoraConfig`` with ``rank_pattern`` / ``alpha_pattern``
  realising the ranks (``LoraConfig.from_pretrained(DIR)`` reads it);
- ``heatmap.png``: ranks per block and module type (needs matplotlib; ``--no-heatmap`` skips it,
  and removes a ``heatmap.png`` an earlier run left in DIR, which would show other ranks).

transformers and peft are needed, and matplotlib unless ``--no-heatmap``: a missing package is
reported before the model is loaded, so no run stops after minutes of measuring.

The loss the sensitivities are measured on follows the model: causal-LM loss for a
``*ForCausalLM`` / ``*LMHeadModel``, masked-LM loss (15% of tokens, seeded) for a
``*ForMaskedLM``, otherwise (a bare encoder, e.g. all-MiniLM-L6-v2) the in-batch contrastive
loss of sentence embeddings that such encoders are trained with (each line split in halves that
must find each other). ``--data`` is a text file with one example per non-empty line. Everything
is read from local files; nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from lorambo.cli import _folder, _parse_number, _positive_float, _positive_int, _seed
from lorambo.optional import requires

METHODS = ("hessian", "gradient", "data", "frobenius")
# LoRAMBoOptimizer's allocations but knapsack, whose benefit curves a command line cannot pass
ALLOCATIONS = ("closed_form", "uniform", "frobenius_greedy", "data_weighted", "alora")


def add_parser(sub) -> None:
    p = sub.add_parser("allocate", help="per-layer LoRA ranks for a local model; writes ranks, a peft "
                                        "adapter_config.json and a heat map")
    p.add_argument("--model", required=True, help="local transformers model folder")
    p.add_argument("--budget", required=True, type=_positive_float,
                   help="parameter budget sum_i r_i (d_i + k_i), e.g. 150000")
    p.add_argument("--method", choices=METHODS, default="gradient", help="layer sensitivity (default: %(default)s)")
    p.add_argument("--data", default=None, help="text file, one example per line (not needed for frobenius, "
                                                "unless --allocation data_weighted, nor for --allocation "
                                                "uniform / alora)")
    p.add_argument("--out", type=_folder, required=True, help="output folder")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="closed_form",
                   help="lorambo.allocate method (alora: its uniform start; default: %(default)s)")
    p.add_argument("--target-modules", default=None,
                   help="comma-separated module name suffixes (default: every Linear but the head)")
    p.add_argument("--alpha", type=_finite_nonzero_float, default=None,
                   help="LoRA alpha, nonzero (default: the rank, scaling 1)")
    p.add_argument("--batch-size", type=_batch_size, default=8,
                   help="lines per batch (at least 2; default: %(default)s)")
    p.add_argument("--batches", type=_positive_int, default=4, help="batches of --data used (default: %(default)s)")
    p.add_argument("--max-length", type=_max_length, default=64,
                   help="tokens per example (at least 2; default: %(default)s)")
    p.add_argument("--probes", type=_positive_int, default=8, help="Hutchinson probes (hessian; default: %(default)s)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="random seed (Hessian probes, masked-LM masks; default: %(default)s)")
    p.add_argument("--no-heatmap", action="store_true", help="do not draw heatmap.png (no matplotlib needed)")
    p.set_defaults(func=run)


# Checked when parsed, before minutes of loading and measuring: a NaN alpha would otherwise land
# in adapter_config.json (as the non-JSON token NaN), alpha 0 (scaling 0: an adapter that adds
# nothing) is refused by LoRAMBoOptimizer only after the model has loaded, and tokenizers silently
# ignore a max_length below their special tokens (0 and 1 do not truncate at all) or crash on a
# negative one.
def _finite_nonzero_float(text: str) -> float:
    return _parse_number(text, float, lambda v: math.isfinite(v) and v != 0, "a finite nonzero number")


def _batch_size(text: str) -> int:
    return _parse_number(text, int, lambda v: v >= 2, "a whole number >= 2 (the loss contrasts examples)")


def _max_length(text: str) -> int:
    return _parse_number(text, int, lambda v: v >= 2, "a whole number >= 2")


def _lines(path: str, need: int) -> list[str]:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--data {path}: {'a folder, not a text file' if file.is_dir() else 'no such file'}")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:  # its own message names neither the option nor the file
        raise ValueError(f"--data {path} is not UTF-8 text ({err}); convert it, e.g. iconv -t UTF-8") from None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) < need:
        raise ValueError(f"--data {path} has {len(lines)} non-empty lines; at least {need} are needed")
    return lines


def _check_out(out: Path, model: Path) -> None:
    """ValueError unless ``out`` is a folder or can become one (otherwise found only when the files
    are written, after the measuring, as a FileExistsError / NotADirectoryError traceback) and is
    not the model's folder: transformers loads a folder holding adapter_config.json as a peft
    adapter, so from_pretrained(model) would then fail for want of adapter weights."""
    if out.resolve() == model.resolve():
        raise ValueError(f"--out {out} is the --model folder: an adapter_config.json there would make "
                         "transformers load the model as a peft adapter; write to another folder")
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, not a folder")


def _load(folder: Path, eager: bool):
    with requires("transformers", "lorambo allocate"):
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"--model {folder}: no config.json (a local transformers model folder is needed)")
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    archs = config.architectures or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        kind, auto = "causal", AutoModelForCausalLM
    elif any(a.endswith("ForMaskedLM") for a in archs):
        kind, auto = "masked", AutoModelForMaskedLM
    else:
        kind, auto = "contrastive", AutoModel
    # Hessian-vector products differentiate twice; fused SDPA kernels have no double backward.
    extra = {"attn_implementation": "eager"} if eager else {}
    model = auto.from_pretrained(folder, local_files_only=True, dtype="float32", **extra)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    # without its files transformers builds a tokenizer of special tokens only: every word would
    # be [UNK] (or no token at all), and the sensitivities would measure nothing of the data
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise ValueError(f"--model {folder}: its tokenizer has no ordinary tokens ({len(tokenizer)} special "
                         "ones only): the folder lacks the tokenizer's files (vocab.txt, tokenizer.json, ...); "
                         "save the tokenizer beside the model with tokenizer.save_pretrained(folder)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return model.eval(), tokenizer, kind


def _loss_fn(kind: str, tokenizer, max_length: int, seed: int):
    import torch

    def encode(texts):
        return tokenizer(list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt")

    if kind == "contrastive":
        from lorambo.experiments.minilm import mean_pool

        def contrastive(model, texts):
            halves = [t.split() for t in texts]
            firsts = [" ".join(w[: max(1, len(w) // 2)]) for w in halves]
            seconds = [" ".join(w[max(1, len(w) // 2):]) or t for w, t in zip(halves, texts)]
            emb = []
            for part in (firsts, seconds):
                batch = encode(part)
                hidden = model(**batch).last_hidden_state
                emb.append(torch.nn.functional.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1))
            logits = emb[0] @ emb[1].t() / 0.05
            target = torch.arange(len(texts))
            return 0.5 * (torch.nn.functional.cross_entropy(logits, target)
                          + torch.nn.functional.cross_entropy(logits.t(), target))
        return contrastive

    def lm(model, texts):
        batch = encode(texts)
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        if kind == "masked":
            g = torch.Generator().manual_seed(seed + sum(map(len, texts)))
            pick = (torch.rand(labels.shape, generator=g) < 0.15) & (batch["attention_mask"] == 1)
            pick[:, 1] |= ~pick.any(1)  # at least one masked token per row
            labels[~pick] = -100
            batch["input_ids"] = batch["input_ids"].masked_fill(pick, tokenizer.mask_token_id)
        return model(**batch, labels=labels).loss
    return lm


def _json_writer(obj):
    from lorambo.adapters.atomic import text_writer

    return text_writer(json.dumps(obj, indent=2, default=list) + "\n")


def run(args) -> int:
    import torch

    from lorambo.adapters.peft_patterns import peft_config
    from lorambo.adapters.atomic import atomic_write_many
    from lorambo.allocation.report import heatmap_figure, rank_table
    from lorambo.cli.deps import require
    from lorambo.optimizer import LoRAMBoOptimizer

    # "model": transformers, "experiment": peft (the LoraConfig), "plots": matplotlib
    require({"model", "experiment"} | (set() if args.no_heatmap else {"plots"}), "allocate",
            hint="; --no-heatmap needs no matplotlib")
    folder, out = Path(args.model), Path(args.out)
    _check_out(out, folder)
    batches, loss_fn = None, None
    # uniform (and alora's uniform start) measure nothing, so --method is unused there; data_weighted
    # measures input covariances whatever --method is (frobenius included)
    measures = args.allocation not in ("uniform", "alora")
    if (measures and args.method != "frobenius") or args.allocation == "data_weighted":
        if args.data is None:  # the data before the model: a bad file fails in a second
            raise ValueError(f"--method {args.method} --allocation {args.allocation} needs --data (a text file)")
        lines = _lines(args.data, args.batch_size)
        batches = [lines[i:i + args.batch_size] for i in range(0, len(lines), args.batch_size)]
        batches = [b for b in batches if len(b) == args.batch_size][: args.batches]
    torch.manual_seed(args.seed)
    model, tokenizer, kind = _load(folder, eager=measures and args.method == "hessian")
    if batches is not None:
        loss_fn = _loss_fn(kind, tokenizer, args.max_length, args.seed)
    targets = [t.strip() for t in args.target_modules.split(",") if t.strip()] if args.target_modules else None
    opt = LoRAMBoOptimizer(model, total_budget=args.budget, sensitivity_method=args.method,
                           target_modules=targets, allocation=args.allocation, alpha=args.alpha,
                           num_probes=args.probes, seed=args.seed)
    ranks = opt.compute_optimal_ranks(batches, loss_fn)
    config = peft_config(ranks, alpha=args.alpha)
    config.base_model_name_or_path = str(folder.resolve())
    # all or none: a ranks.json beside an earlier run's adapter_config.json would give peft other ranks
    writes = {out / "ranks.json": _json_writer({
        "model": str(folder.resolve()), "method": args.method if measures else None, "allocation": args.allocation,
        "loss": kind if loss_fn else None, "budget": opt.total_budget, "ranks": ranks,
        "capacities": opt.capacities, "sensitivities": opt.sensitivities, "alpha": args.alpha}),
              out / "adapter_config.json": _json_writer(config.to_dict())}
    if not args.no_heatmap:
        fig = heatmap_figure(ranks, title=f"LoRA ranks ({args.method if measures else args.allocation}, "
                                   f"budget {opt.total_budget:,})")
        writes[out / "heatmap.png"] = lambda tmp: fig.savefig(tmp, format="png", dpi=100)
    written = atomic_write_many(writes, "lorambo allocate")
    if args.no_heatmap and (out / "heatmap.png").is_file():  # an earlier run's: it would sit beside these ranks
        (out / "heatmap.png").unlink()
        print(f"removed {out / 'heatmap.png'} (an earlier run's; --no-heatmap)")
    print(rank_table(ranks, opt.capacities, opt.dims))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m lorambo.cli.allocate ARGS``: ``lorambo allocate ARGS`` (``argv``: default the command line)."""
    from lorambo.cli import main as lorambo_main

    return lorambo_main(["allocate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
