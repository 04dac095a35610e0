"""``lorambo allocate``: ranks, a peft adapter_config.json that peft builds the same ranks from, a heat map."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

from lorambo.cli import main
from lorambo.experiments.minilm import minilm_path

SENTENCES = [f"the {a} {b} walked over the {c} hill before the {d} rain came down"
             for a, b, c, d in zip(["old", "young", "tall", "small", "quiet", "loud", "kind", "brave"] * 2,
                                   ["man", "dog", "cat", "girl", "boy", "horse", "bird", "fox"] * 2,
                                   ["green", "steep", "far", "near", "red", "bare", "wet", "dry"] * 2,
                                   ["cold", "warm", "late", "early", "heavy", "light", "soft", "hard"] * 2)]


def _peft_ranks(model, out):
    peft_model = get_peft_model(model, LoraConfig.from_pretrained(str(out)))
    return {n: m.r["default"] for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}, \
        {n: m.scaling["default"] for n, m in peft_model.get_base_model().named_modules() if isinstance(m, LoraLayer)}


def _check_outputs(out, budget, heatmap=True):
    saved = json.loads((out / "ranks.json").read_text())
    if heatmap:
        assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "ranks.json"]
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left behind
    ranks = saved["ranks"]
    assert any(r > 0 for r in ranks.values()) and len(set(ranks.values())) > 1
    return saved, ranks


def test_allocate_real_minilm_gradient(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    budget = 40_000
    assert main(["allocate", "--model", str(minilm_path()), "--budget", str(budget), "--method", "gradient",
                 "--data", str(data), "--out", str(out), "--batch-size", "4", "--batches", "2",
                 "--target-modules", "query,value", "--no-heatmap"]) == 0
    saved, ranks = _check_outputs(out, budget, heatmap=False)
    assert saved["loss"] == "contrastive" and len(ranks) == 12
    from transformers import AutoModel
    dims = {n: m.in_features + m.out_features for n, m in AutoModel.from_pretrained(minilm_path()).named_modules()
            if n in ranks}
    assert sum(r * dims[n] for n, r in ranks.items()) <= budget
    peft_ranks, scaling = _peft_ranks(AutoModel.from_pretrained(minilm_path()), out)
    assert peft_ranks == {n: r for n, r in ranks.items() if r > 0}
    assert all(s == pytest.approx(1.0) for s in scaling.values())  # lorambo's default alpha = rank
    assert (saved["method"], saved["allocation"], saved["budget"]) == ("gradient", "closed_form", budget)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(minilm_path().resolve())
    # the printed table: rank, capacity and r (d + k) per layer, then the totals
    printed = capsys.readouterr().out.splitlines()
    assert not [line for line in printed if "removed" in line]  # no earlier heatmap.png was there
    cells = [line.split() for line in printed]
    rows = {c[0]: [int(v) for v in c[1:]] for c in cells if c and c[0] in ranks}
    assert rows == {n: [r, saved["capacities"][n], r * dims[n]] for n, r in ranks.items()}
    assert printed[-2].split() == ["total", str(sum(ranks.values())), str(sum(r * dims[n] for n, r in ranks.items()))]
    assert printed[-1] == f"wrote {out / 'ranks.json'}, {out / 'adapter_config.json'}"


def _recorded(monkeypatch, module, name):
    """Patch ``module.name`` to keep every value it returns (in the returned list)."""
    real, kept = getattr(module, name), []
    monkeypatch.setattr(module, name, lambda *a, **kw: kept.append(real(*a, **kw)) or kept[-1])
    return kept


def test_allocate_causal_lm_hessian(tmp_path, monkeypatch):
    """Also: the Hessian's model runs eager attention (fused SDPA kernels have no double
    backward), and the heat map's title names the sensitivity and the budget."""
    pytest.importorskip("matplotlib")  # the heat map's optional dependency
    from lorambo.allocation import report
    from lorambo.cli import allocate as allocate_cli

    loaded, figures = _recorded(monkeypatch, allocate_cli, "_load"), _recorded(monkeypatch, report, "heatmap_figure")
    from transformers import GPT2Config, GPT2LMHeadModel
    folder = tmp_path / "gpt2"
    torch.manual_seed(0)
    tiny = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    tiny.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(SENTENCES[:6]))
    out = tmp_path / "out"
    assert main(["allocate", "--model", str(folder), "--budget", "2000", "--method", "hessian", "--probes", "2",
                 "--data", str(data), "--out", str(out), "--batch-size", "3", "--alpha", "16"]) == 0
    saved, ranks = _check_outputs(out, 2000)
    assert saved["loss"] == "causal" and saved["alpha"] == 16
    peft_ranks, scaling = _peft_ranks(GPT2LMHeadModel.from_pretrained(folder), out)
    assert peft_ranks == {n: r for n, r in ranks.items() if r > 0}
    assert all(scaling[n] == pytest.approx(16 / r) for n, r in peft_ranks.items())
    (model, _, _), = loaded
    assert model.config._attn_implementation == "eager"
    (figure,) = figures
    assert figure.axes[0].get_title() == "LoRA ranks (hessian, budget 2,000)"


def test_allocate_bad_arguments(tmp_path, capsys):
    assert main(["allocate", "--model", str(tmp_path), "--budget", "100", "--out", str(tmp_path / "o"),
                 "--method", "frobenius", "--no-heatmap"]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["allocate", "--model", str(minilm_path()), "--budget", "100000", "--out", str(tmp_path / "o"),
                 "--method", "gradient", "--no-heatmap"]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flag, value, expected", [
    ("--alpha", "nan", "a finite nonzero number"), ("--alpha", "inf", "a finite nonzero number"),
    ("--alpha", "0", "a finite nonzero number"), ("--alpha", "-0.0", "a finite nonzero number"),
    ("--max-length", "1", ">= 2"), ("--max-length", "-3", ">= 2"), ("--max-length", "0", ">= 2"),
    ("--probes", "0", ">= 1"), ("--batches", "0", ">= 1"), ("--batch-size", "1", ">= 2"),
    ("--budget", "nan", "a positive number"), ("--budget", "-5", "a positive number"),
    ("--seed", str(2**64), "in [0, 2**63)"), ("--seed", "-1", "in [0, 2**63)"),
])
def test_allocate_bad_numbers_are_usage_errors_before_loading(tmp_path, capsys, flag, value, expected):
    """They ran through: --alpha nan wrote ``"lora_alpha": NaN`` (not JSON) into
    adapter_config.json, --max-length 0 / 1 were silently ignored by the tokenizer (no
    truncation), -3 crashed in it with a traceback, the others failed after the model loaded."""
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    args = {"--model": str(minilm_path()), "--budget": "40000", "--method": "frobenius", "--data": str(data),
            "--out": str(out), "--target-modules": "query", flag: value}
    with pytest.raises(SystemExit) as stop:
        main(["allocate", *[x for k, v in args.items() for x in (k, v)], "--no-heatmap"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: expected" in err and expected in err and value in err
    assert not out.exists()


def test_allocate_out_is_a_file_fails_before_measuring(tmp_path, capsys):
    """--out naming a file (or a path below one) raised FileExistsError / NotADirectoryError with
    a traceback when the files were written, after loading and measuring; a missing --data file
    was found only after the model had loaded."""
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    blocker = tmp_path / "taken"
    blocker.write_text("keep me\n")
    for out in (blocker, blocker / "sub" / "dir"):
        assert main(["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "gradient",
                     "--data", str(data), "--out", str(out), "--target-modules", "query", "--no-heatmap"]) == 2
        assert f"--out {out}: {blocker} is a file, not a folder" in capsys.readouterr().err
        assert blocker.read_text() == "keep me\n"
    # the data is read before the model: a folder without config.json is not even looked at
    assert main(["allocate", "--model", str(tmp_path), "--budget", "40000", "--method", "gradient",
                 "--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o"), "--no-heatmap"]) == 2
    assert f"--data {tmp_path / 'missing.txt'}: no such file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_allocate_frobenius_with_data_weighted_reads_the_data(tmp_path, capsys):
    """--allocation data_weighted measures input covariances whatever the sensitivity; with
    --method frobenius the data file was never read, so it failed after loading ('needs batches
    and loss_fn') although --data was given."""
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES) + "\n")
    out = tmp_path / "out"
    args = ["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "frobenius",
            "--allocation", "data_weighted", "--out", str(out), "--target-modules", "query,value",
            "--batch-size", "4", "--batches", "2", "--max-length", "16", "--no-heatmap"]
    assert main(args) == 2  # no --data: said before the model loads
    assert "needs --data" in capsys.readouterr().err and not out.exists()
    assert main(args + ["--data", str(data)]) == 0
    saved, ranks = _check_outputs(out, 40000, heatmap=False)
    assert saved["loss"] == "contrastive" and saved["sensitivities"] == dict.fromkeys(ranks, 1.0)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] == {n: r for n, r in ranks.items() if r > 0}
    assert sum(r * (384 + 384) for r in ranks.values()) <= 40000


def test_allocate_allocation_choices(tmp_path, capsys):
    """--allocation knapsack (no way to pass its benefit curves) or a typo failed only after the
    model had loaded; now argparse lists the choices: every LoRAMBoOptimizer allocation but knapsack."""
    from lorambo.cli.allocate import ALLOCATIONS
    from lorambo.optimizer import ALLOCATIONS as ALL

    assert set(ALLOCATIONS) == set(ALL) - {"knapsack"}
    for bad in ("knapsack", "closed-form"):
        with pytest.raises(SystemExit) as stop:
            main(["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "frobenius",
                  "--allocation", bad, "--out", str(tmp_path / "o"), "--no-heatmap"])
        assert stop.value.code == 2 and "argument --allocation: invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_allocate_no_heatmap_removes_an_earlier_runs_heatmap(tmp_path, capsys):
    """A second run into the same --out with --no-heatmap left the first run's heatmap.png, drawn
    from other ranks, beside the new ranks.json."""
    out = tmp_path / "o"
    out.mkdir()
    (out / "heatmap.png").write_bytes(b"\x89PNG\r\n\x1a\n an earlier run's ranks")
    assert main(["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "frobenius",
                 "--out", str(out), "--no-heatmap"]) == 0
    _check_outputs(out, 40000, heatmap=False)
    assert "removed" in capsys.readouterr().out


def test_allocate_refuses_to_write_into_the_model_folder(tmp_path, capsys):
    """--out = --model wrote adapter_config.json beside the weights; transformers then loads the
    folder as a peft adapter and AutoModel.from_pretrained fails (no adapter_model.safetensors)."""
    from transformers import AutoModel

    folder = tmp_path / "model"
    shutil.copytree(minilm_path(), folder)
    for out in (folder, tmp_path / "model" / ".." / "model"):
        assert main(["allocate", "--model", str(folder), "--budget", "40000", "--method", "frobenius",
                     "--out", str(out), "--target-modules", "query", "--no-heatmap"]) == 2
        assert "is the --model folder" in capsys.readouterr().err
    assert not (folder / "adapter_config.json").exists() and not (folder / "ranks.json").exists()
    AutoModel.from_pretrained(folder, local_files_only=True)  # still a plain model folder


def test_allocate_data_that_is_not_utf8_text_is_named(tmp_path, capsys):
    """A Latin-1 --data file failed with "error: 'utf-8' codec can't decode byte 0xe9 in position
    4: invalid continuation byte", naming neither the option nor the file; a folder was 'no such file'."""
    data = tmp_path / "latin1.txt"
    data.write_bytes("\n".join(["caf\u00e9 au lait " + s for s in SENTENCES]).encode("latin-1"))
    args = ["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "gradient",
            "--out", str(tmp_path / "o"), "--no-heatmap", "--data"]
    assert main(args + [str(data)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lorambo allocate: error: --data {data} is not UTF-8 text ('utf-8' codec can't decode "
                          "byte 0xe9 in position 3: invalid continuation byte)")
    assert main(args + [str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"lorambo allocate: error: --data {tmp_path}: a folder, not a text file\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("allocation", ["uniform", "alora"])
def test_allocate_uniform_needs_no_data_and_claims_no_measurement(allocation, tmp_path, capsys):
    """Uniform ranks (alora's start) measure nothing, yet the default --method gradient asked for
    --data; given it, ranks.json named the gradient and the contrastive loss as if measured."""
    out = tmp_path / "out"
    assert main(["allocate", "--model", str(minilm_path()), "--budget", "20000", "--allocation", allocation,
                 "--out", str(out), "--target-modules", "query,value", "--no-heatmap"]) == 0
    saved = json.loads((out / "ranks.json").read_text())
    assert (saved["method"], saved["loss"], saved["sensitivities"]) == (None, None, None)
    # 12 layers of 384 x 384 cost 768 per rank: 20000 // (12 * 768) = 2 each, the 1568 left buys 2 more
    assert sorted(saved["ranks"].values()) == [2] * 10 + [3] * 2
    assert sum(r * 768 for r in saved["ranks"].values()) == 20000 - 20000 % 768
    assert "total" in capsys.readouterr().out


def test_python_m_lorambo_cli_allocate_is_lorambo_allocate(tmp_path):
    """``python -m lorambo.cli.allocate ...`` (the entry its ``main`` names) exited 0 having done
    nothing: no ``__main__`` guard, and ``main()`` ignored the command line; now it is ``lorambo
    allocate``, its errors one line as there."""
    import os
    import subprocess
    import sys

    run = [sys.executable, "-m", "lorambo.cli.allocate"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([*run, "--model", str(tmp_path), "--budget", "100", "--method", "frobenius",
                           "--out", str(tmp_path / "o"), "--no-heatmap"], capture_output=True, text=True, env=env)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"lorambo allocate: error: --model {tmp_path}: no config.json (a local transformers " \
                          "model folder is needed)\n"


@pytest.mark.parametrize("eos, expected", [("[SEP]", "[SEP]"), (None, "[UNK]")])
def test_a_tokenizer_without_a_pad_token_pads_with_its_eos_else_its_unk_token(tmp_path, eos, expected):
    """Causal LMs' tokenizers (GPT-2's, Llama's) have no pad token, and the batches are padded:
    ``lorambo allocate`` pads with the end-of-text token, or the unknown token where there is none."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lorambo.cli.allocate import _load

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=8, n_layer=1, n_head=2, n_positions=16)).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    tokenizer.pad_token, tokenizer.eos_token = None, eos
    tokenizer.save_pretrained(folder)
    _, loaded, kind = _load(folder, eager=False)
    assert kind == "causal" and loaded.pad_token == expected and loaded.unk_token == "[UNK]"


def test_the_encoder_loss_is_in_batch_infonce_at_sentence_transformers_scale():
    """A bare encoder's sensitivities are measured on the loss it was trained with: each line's
    first half must find its second half among the batch, cosine similarities at scale 20
    (temperature 0.05), symmetric cross-entropy; here against a float64 computation written out."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from lorambo.cli.allocate import _loss_fn

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=32)).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = SENTENCES[:4] + ["rain", "cold rain falls"]  # one word: its second half is the whole line
    with torch.no_grad():
        got = _loss_fn("contrastive", tokenizer, 12, 0)(model, texts)

        def embed(parts):
            enc = tokenizer(parts, padding=True, truncation=True, max_length=12, return_tensors="pt")
            mask = enc["attention_mask"].double().unsqueeze(-1)
            mean = (model(**enc).last_hidden_state * mask).sum(1) / mask.sum(1)
            return mean / mean.norm(dim=-1, keepdim=True)

        words = [t.split() for t in texts]
        cut = [max(1, len(w) // 2) for w in words]
        a = embed([" ".join(w[:c]) for w, c in zip(words, cut)])
        b = embed([" ".join(w[c:]) or t for w, c, t in zip(words, cut, texts)])
        logits = 20.0 * a @ b.T
        log_rows, log_cols = logits.log_softmax(1), logits.log_softmax(0)
        expected = -0.5 * (log_rows.diagonal().mean() + log_cols.diagonal().mean())
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(expected), rel=1e-9)


def test_the_causal_lm_loss_is_next_token_cross_entropy_over_real_tokens():
    """A causal LM's sensitivities are measured on its own loss: next-token cross-entropy over the
    lines' tokens, padding excluded, nothing masked; here against a float64 computation written out."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from lorambo.cli.allocate import _loss_fn

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=30522, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    model = model.double().eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = [SENTENCES[0], "rain came", "a dog"]  # padded to the longest, truncated to 12 tokens
    with torch.no_grad():
        got = _loss_fn("causal", tokenizer, 12, 0)(model, texts)
        enc = tokenizer(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
        assert (enc["attention_mask"] == 0).any()
        assert enc["input_ids"].shape[1] == 12 < len(tokenizer(texts[0]).input_ids)
        logits = model(**enc).logits
        log_p = logits[:, :-1].log_softmax(-1).gather(-1, enc["input_ids"][:, 1:, None])[..., 0]
        real = enc["attention_mask"][:, 1:].bool()
        expected = -log_p[real].mean()
    assert float(got) == pytest.approx(float(expected), rel=1e-6)  # transformers takes the loss in float32


def test_the_smallest_allowed_sizes_parse():
    """--batch-size 2 (two lines contrast each other) and --max-length 2 are the documented minimums."""
    from lorambo.cli import build_parser

    args = build_parser().parse_args(["allocate", "--model", "m", "--budget", "10", "--out", "o",
                                      "--batch-size", "2", "--max-length", "2"])
    assert (args.batch_size, args.max_length) == (2, 2)


def _tiny_folder(folder, model):
    """``model`` saved with MiniLM's tokenizer: a local model folder ``_load`` reads."""
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(minilm_path() / name, folder / name)
    return folder


def test_the_model_kind_follows_the_architecture(tmp_path):
    """*ForMaskedLM loads with its head and gets the masked-LM loss; a config.json without
    ``architectures`` (written by a bare config, not a model) is a bare encoder; a tokenizer with
    a pad token of its own keeps it; the Hessian's eager attention reaches the model."""
    from transformers import BertConfig, BertForMaskedLM, BertModel

    from lorambo.cli.allocate import _load

    config = BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    masked = _tiny_folder(tmp_path / "mlm", BertForMaskedLM(config))
    model, tokenizer, kind = _load(masked, eager=True)
    assert (kind, type(model).__name__) == ("masked", "BertForMaskedLM")
    assert model.config._attn_implementation == "eager" and tokenizer.pad_token == "[PAD]"
    bare = _tiny_folder(tmp_path / "bare", BertModel(config))
    saved = json.loads((bare / "config.json").read_text())
    del saved["architectures"]
    (bare / "config.json").write_text(json.dumps(saved))
    model, _, kind = _load(bare, eager=False)
    assert (kind, type(model).__name__) == ("contrastive", "BertModel")


class _Recording(torch.nn.Module):
    """The model, keeping the inputs each call gets."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, **inputs):
        self.calls.append(inputs)
        return self.inner(**inputs)


def test_the_masked_lm_loss_masks_15_percent_of_real_tokens_at_least_one_per_line():
    """A masked LM's sensitivities are measured on its own loss: about 15% of each batch's real
    tokens (never padding) replaced by [MASK], at least one per line, the same ones for the same
    seed; cross-entropy over those only, here against a float64 computation written out."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    from lorambo.cli.allocate import _loss_fn

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32)).double().eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    texts = SENTENCES + ["a dog", "rain", " ".join(SENTENCES[:3])]  # short lines, and one past max_length
    recording = _Recording(model)
    with torch.no_grad():
        got = _loss_fn("masked", tokenizer, 20, 3)(recording, texts)
        (seen,) = recording.calls
        enc = tokenizer(texts, padding=True, truncation=True, max_length=20, return_tensors="pt")
        assert seen["input_ids"].shape == (len(texts), 20)  # truncated to --max-length
        picked = seen["labels"] != -100
        real = enc["attention_mask"] == 1
        assert not (picked & ~real).any() and picked.any(1).all()
        assert 0.1 < picked.sum() / real.sum() < 0.2
        assert torch.equal(seen["labels"][picked], enc["input_ids"][picked])
        assert torch.equal(seen["input_ids"], enc["input_ids"].masked_fill(picked, tokenizer.mask_token_id))
        log_p = model(**seen).logits.log_softmax(-1)
        expected = -log_p[picked].gather(-1, enc["input_ids"][picked][:, None]).mean()
        again = _Recording(model)
        assert float(_loss_fn("masked", tokenizer, 20, 3)(again, texts)) == float(got)
        assert torch.equal(again.calls[0]["labels"], seen["labels"])
    assert got.dtype == torch.float64 and float(got) == pytest.approx(float(expected), rel=1e-9)


def test_data_with_fewer_lines_than_a_batch_is_refused_before_loading(tmp_path, capsys):
    """--data must fill one batch of --batch-size lines (the loss contrasts them); exactly one
    batch is enough."""
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(SENTENCES[:4]) + "\n  \n")  # 4 non-empty lines
    out = tmp_path / "out"
    args = ["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "gradient",
            "--data", str(data), "--out", str(out), "--target-modules", "query", "--no-heatmap", "--batch-size"]
    assert main(args + ["5"]) == 2
    assert capsys.readouterr().err == (f"lorambo allocate: error: --data {data} has 4 non-empty lines; "
                                       "at least 5 are needed\n")
    assert not out.exists()
    assert main(args + ["4"]) == 0
    saved = json.loads((out / "ranks.json").read_text())
    assert saved["loss"] == "contrastive" and len(set(saved["sensitivities"].values())) == 6


def test_missing_required_options_and_defaults_the_checks_accept(capsys):
    """--model, --budget and --out are required (a usage error naming them); every default is a
    value its own option accepts."""
    from lorambo.cli import build_parser

    parser = build_parser()
    for dropped in ("--model", "--budget", "--out"):
        given = {"--model": "m", "--budget": "10", "--out": "o"}
        del given[dropped]
        with pytest.raises(SystemExit) as stop:
            parser.parse_args(["allocate", *[x for kv in given.items() for x in kv]])
        assert stop.value.code == 2 and f"required: {dropped}" in capsys.readouterr().err
    (allocate,) = [a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("allocate")]
    typed = [a for a in allocate._actions if a.type is not None and a.default is not None]
    assert {a.dest for a in typed} >= {"batch_size", "batches", "max_length", "probes", "seed"}
    for action in typed:
        assert action.type(str(action.default)) == action.default, action.dest


def test_the_batches_are_the_first_full_ones_of_the_non_empty_lines(tmp_path, monkeypatch):
    """--batches N measures on the first N batches of --batch-size non-empty lines, in file order;
    a last batch short of --batch-size is left out."""
    from lorambo.cli import allocate as allocate_cli

    real, seen = allocate_cli._loss_fn, []

    def recording(*args):
        loss = real(*args)
        return lambda model, texts: seen.append(list(texts)) or loss(model, texts)

    monkeypatch.setattr(allocate_cli, "_loss_fn", recording)
    lines = SENTENCES[:11]
    data = tmp_path / "data.txt"
    data.write_text("".join(f"  {line} \n\n" for line in lines))
    for batches, expected in (("2", [lines[0:3], lines[3:6]]), ("9", [lines[0:3], lines[3:6], lines[6:9]])):
        seen.clear()
        assert main(["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "gradient",
                     "--data", str(data), "--out", str(tmp_path / batches), "--target-modules", "query",
                     "--batch-size", "3", "--batches", batches, "--no-heatmap"]) == 0
        assert [b for i, b in enumerate(seen) if b not in seen[:i]] == expected


def test_the_same_seed_gives_the_same_sensitivities(tmp_path):
    """A masked-LM folder whose checkpoint lacks the MLM head (a bare encoder's weights): the head
    is drawn at random when loaded, and --seed fixes it, as it fixes the masks."""
    from transformers import BertConfig, BertModel

    folder = _tiny_folder(tmp_path / "mlm", BertModel(BertConfig(hidden_size=16, num_hidden_layers=2,
                                                                 num_attention_heads=2, intermediate_size=32)))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, architectures=["BertForMaskedLM"])))
    data = tmp_path / "data.txt"
    data.write_text("\n".join(SENTENCES) + "\n")

    def sensitivities(seed, out):
        assert main(["allocate", "--model", str(folder), "--budget", "400", "--method", "gradient",
                     "--data", str(data), "--out", str(tmp_path / out), "--batch-size", "4", "--batches", "2",
                     "--seed", seed, "--no-heatmap"]) == 0
        saved = json.loads((tmp_path / out / "ranks.json").read_text())
        assert saved["loss"] == "masked"
        return saved["sensitivities"]

    first = sensitivities("1", "a")
    assert sensitivities("1", "b") == first
    assert sensitivities("2", "c") != first


def test_the_heatmap_title_names_the_allocation_where_nothing_is_measured(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")  # the heat map's optional dependency
    from lorambo.allocation import report

    figures = _recorded(monkeypatch, report, "heatmap_figure")
    out = tmp_path / "out"
    assert main(["allocate", "--model", str(minilm_path()), "--budget", "20000", "--allocation", "uniform",
                 "--out", str(out), "--target-modules", "query,value"]) == 0
    assert figures[0].axes[0].get_title() == "LoRA ranks (uniform, budget 20,000)"
    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_allocate_main_reads_the_arguments_it_is_given(tmp_path, capsys):
    """``lorambo.cli.allocate.main(argv)`` runs on ``argv``, not on the process's command line."""
    from lorambo.cli.allocate import main as allocate_main

    assert allocate_main(["--model", str(tmp_path), "--budget", "100", "--method", "frobenius",
                          "--out", str(tmp_path / "o"), "--no-heatmap"]) == 2
    assert capsys.readouterr().err == (f"lorambo allocate: error: --model {tmp_path}: no config.json (a local "
                                       "transformers model folder is needed)\n")


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_a_model_folder_without_tokenizer_files_is_a_usage_error(tmp_path, capsys, kind):
    """transformers builds a tokenizer of special tokens only from such a folder: MiniLM's words
    all became [UNK] and ranks were written measured on no word; GPT-2's gave no token and a
    traceback. Now: exit 2, a line naming --model and the folder, nothing written."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = (BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
             if kind == "bert" else GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, n_positions=32)))
    folder, out, data = tmp_path / kind, tmp_path / "out", tmp_path / "data.txt"
    model.save_pretrained(folder)
    data.write_text("\n".join(SENTENCES) + "\n")
    assert main(["allocate", "--model", str(folder), "--budget", "400", "--method", "gradient", "--data", str(data),
                 "--out", str(out), "--no-heatmap"]) == 2
    err = capsys.readouterr().err
    assert f"--model {folder}: its tokenizer has no ordinary tokens" in err and "Traceback" not in err
    assert not out.exists()
