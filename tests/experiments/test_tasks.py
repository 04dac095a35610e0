"""The data plumbing of lorambo/experiments/tasks.py on small made-up data (no model): text cut
into full windows, splits that share no window, batch rows trimmed to their longest sequence,
and the per-seed training stream every method shares."""

import random
from types import SimpleNamespace

import pytest
import torch

from lorambo.experiments.tasks import Task, _rows, disjoint_windows, document_splits, make_task, planted_text, \
    token_windows

CLS, SEP = 101, 102


class WordTokenizer:
    """Each word is its token id (its length plus 1000, so ids repeat as real ones do)."""
    cls_token_id, sep_token_id = CLS, SEP

    def __call__(self, text, add_special_tokens=True, verbose=True):
        assert add_special_tokens is False  # the windows add [CLS] and [SEP] themselves
        return {"input_ids": [1000 + i for i in range(len(text.split()))]}


def test_every_window_is_full_and_a_shorter_rest_is_dropped():
    width = 6 - 2
    docs = ["w " * (2 * width + 3), "w " * width, "w " * (width - 1), "w " * (2 * width)]
    rows = token_windows(WordTokenizer(), docs, max_length=6)
    ids = [1000 + i for i in range(2 * width + 3)]
    assert rows == [[CLS, *ids[:width], SEP], [CLS, *ids[width:2 * width], SEP],  # the rest of 3 is dropped
                    [CLS, *ids[:width], SEP],                                     # exactly one window
                    [CLS, *ids[:width], SEP], [CLS, *ids[width:2 * width], SEP]]  # none from the short one
    assert all(len(r) == 6 for r in rows)


def test_a_window_an_earlier_split_holds_is_dropped_from_the_later_splits():
    a, b, c, d = [1, 2], [3, 4], [5, 6], [7, 8]
    out = disjoint_windows({"train": [a, b, a], "val": [b, c, c], "test": [a, c, d]})
    assert out == {"train": [a, b, a], "val": [c, c], "test": [d]}  # repeats within a split are kept


def test_document_splits_are_a_fixed_70_15_15_partition():
    docs = [f"document {i}" for i in range(40)]
    parts = document_splits(docs)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [28, 6, 6]
    assert sorted(parts["train"] + parts["val"] + parts["test"]) == sorted(docs)
    assert parts["train"] != docs[:28]  # shuffled first: no split is one end of the corpus
    shuffled = list(docs)
    random.Random(0).shuffle(shuffled)  # the fixed shuffle every committed result was split by
    assert parts == {"train": shuffled[:28], "val": shuffled[28:34], "test": shuffled[34:]}
    assert document_splits(docs) == parts and docs == [f"document {i}" for i in range(40)]  # input untouched


def test_rows_trims_padding_columns_to_the_longest_selected_sequence():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([6, 3, 2, 4])
    mask = (torch.arange(6)[None, :] < lengths[:, None]).long()  # right padding
    data = {"input_ids": torch.randint(1000, 2000, (4, 6), generator=gen), "attention_mask": mask,
            "labels": torch.tensor([1, 0, 1, 0]), "target": torch.randn(4, 6, 3, generator=gen)}
    idx = torch.tensor([1, 3])
    out = _rows(data, idx)
    assert out["input_ids"].shape == (2, 4) and torch.equal(out["input_ids"], data["input_ids"][idx, :4])
    assert torch.equal(out["attention_mask"], mask[idx, :4]) and torch.equal(out["labels"], data["labels"][idx])
    assert torch.equal(out["target"], data["target"][idx, :4])
    whole = _rows(data, slice(0, 4))  # the longest row is the full width: nothing cut
    assert all(torch.equal(whole[k], v) for k, v in data.items())


def _task(train_rows: int, val_rows: int = 5, test_rows: int = 3, cfg=None) -> Task:
    """A Task with made-up splits (rows numbered in ``input_ids``), built without a model."""
    task = Task.__new__(Task)
    task.device, task.cfg = torch.device("cpu"), cfg

    def split(n, start):
        ids = torch.arange(start, start + n)[:, None].repeat(1, 3)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    task.splits = {"train": split(train_rows, 0), "val": split(val_rows, 100), "test": split(test_rows, 200)}
    return task


def _row_ids(batches) -> list[int]:
    return [int(i) for b in batches for i in b["input_ids"][:, 0]]


def test_the_training_stream_is_whole_shuffled_epochs_fixed_by_the_seed():
    task = _task(train_rows=5)
    stream = task.train_batches(seed=3, steps=7, batch_size=2)
    ids = _row_ids(stream)
    assert [len(b["input_ids"]) for b in stream] == [2] * 7
    assert sorted(ids[:5]) == sorted(ids[5:10]) == list(range(5))  # each epoch holds every row once
    assert ids[:5] != list(range(5)) or ids[5:10] != list(range(5))
    rng = random.Random(3)  # the documented rule: one seeded shuffle of the rows per epoch, in turn
    expected = []
    for _ in range(3):
        epoch = list(range(5))
        rng.shuffle(epoch)
        expected += epoch
    assert ids == expected[:14]
    assert _row_ids(task.train_batches(seed=3, steps=3, batch_size=2)) == ids[:6]  # a shorter run: a prefix
    assert _row_ids(task.train_batches(seed=4, steps=7, batch_size=2)) != ids


def test_eva_and_heldout_batches_take_the_first_rows_and_stop_at_the_split():
    task = _task(train_rows=5, val_rows=5)
    assert [_row_ids([b]) for b in task.eva_batches(batches=2, batch_size=2)] == [[0, 1], [2, 3]]
    assert [_row_ids([b]) for b in task.eva_batches(batches=10, batch_size=2)] == [[0, 1], [2, 3], [4]]
    eva = _task(train_rows=70).eva_batches(batches=2)  # docs: "the first eva_batches x 32 training rows"
    assert [_row_ids([b]) for b in eva] == [list(range(32)), list(range(32, 64))]
    assert [_row_ids([b]) for b in task.heldout_batches(3)] == [[100, 101, 102]]
    assert [_row_ids([b]) for b in task.heldout_batches(50)] == [[100, 101, 102, 103, 104]]


@pytest.mark.parametrize("train_cap, val_cap, sizes", [
    (3, 2, (3, 2, 3)), (0, 0, (5, 4, 3)), (9, 4, (5, 4, 3)),  # 0: no cap; a cap above the size: all rows
])
def test_the_caps_keep_the_first_training_and_validation_rows_only(train_cap, val_cap, sizes):
    task = _task(train_rows=5, val_rows=4, cfg=SimpleNamespace(train_examples=train_cap, eval_examples=val_cap))
    task._cap_train()
    assert tuple(task.describe()["sizes"][k] for k in ("train", "val", "test")) == sizes
    assert _row_ids([task.splits["train"]]) == list(range(sizes[0]))
    assert _row_ids([task.splits["test"]]) == [200, 201, 202]  # the test split is never capped


def test_unknown_task_or_text_names_the_value_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"^unknown task 'topics'$"):
        make_task("topics", None, None, None)
    with pytest.raises(ValueError, match=r"^unknown planted_text 'novels'; valid: docstrings, snippets$"):
        planted_text("novels")
