"""The student model on a tiny random BERT: what it returns, which layers it names, and that a
fresh student is a frozen copy that leaves the pretrained encoder alone."""

import pytest
import torch
from transformers import BertConfig, BertModel

from lorambo.experiments.minilm import mean_pool
from lorambo.experiments.student import MODULE_TYPES, Student, dims_of, fresh_student, short, target_names


@pytest.fixture
def bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    return BertModel(config, add_pooling_layer=False).eval()


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 50, (3, 7), generator=gen)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[0, 4:] = 0  # padded rows: a plain mean over every token differs from the masked one
    mask[2, 2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_forward_is_the_hidden_states_or_the_head_on_the_masked_mean(bert):
    batch = _batch()
    hidden = bert(**batch).last_hidden_state
    torch.testing.assert_close(Student(bert)(batch), hidden, rtol=0, atol=0)
    # the mask reaches the encoder: without it the unpadded tokens' states change
    assert (bert(input_ids=batch["input_ids"]).last_hidden_state[0, :4] - hidden[0, :4]).abs().max() > 1e-3
    head = torch.nn.Linear(16, 2)
    mask = batch["attention_mask"].unsqueeze(-1).float()
    by_hand = head((hidden * mask).sum(1) / mask.sum(1))
    torch.testing.assert_close(Student(bert, head)(batch), by_hand)


def test_mean_pool_ignores_padding_and_an_all_padding_row_is_zero_not_nan():
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, 5, 4, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    pooled = mean_pool(hidden, mask)
    torch.testing.assert_close(pooled[0], hidden[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], hidden[1].mean(0))
    assert torch.equal(pooled[2], torch.zeros(4))


def test_target_names_and_dims_cover_every_block_in_order(bert):
    names = target_names(bert)
    assert names == [f"bert.encoder.layer.{i}.{t}" for i in range(3) for t in MODULE_TYPES]
    student = Student(bert)
    assert all(isinstance(student.get_submodule(n), torch.nn.Linear) for n in names)
    dims = dims_of(bert)
    assert list(dims) == [short(n) for n in names]
    assert dims["layer.0.attention.self.query"] == (16, 16)
    assert dims["layer.2.intermediate.dense"] == (24, 16)  # (out_features d, in_features k)
    assert dims["layer.1.output.dense"] == (16, 24)


def test_short_drops_any_prefix_before_layer():
    assert short("bert.encoder.layer.3.output.dense") == "layer.3.output.dense"
    assert short("base_model.model.bert.encoder.layer.0.attention.self.query") == "layer.0.attention.self.query"
    assert short("layer.5.intermediate.dense") == "layer.5.intermediate.dense"
    assert short("pooler.dense") == "pooler.dense"


def test_fresh_student_is_a_frozen_copy_and_seeds_the_run(bert):
    head = torch.nn.Linear(16, 2)
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    student = fresh_student(bert, head, seed=5)
    after_five = torch.rand(4)
    assert student.bert is not bert and student.head is not head
    assert all(not p.requires_grad for p in student.parameters())
    assert all(p.requires_grad for p in bert.parameters()) and all(p.requires_grad for p in head.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())  # the original is untouched
    batch = _batch()
    torch.testing.assert_close(fresh_student(bert, head, seed=5)(batch), Student(bert, head)(batch), rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(4), after_five)  # the same seed: the same random stream after
    fresh_student(bert, head, seed=6)
    assert not torch.equal(torch.rand(4), after_five)
    assert fresh_student(bert, None, seed=5).head is None
