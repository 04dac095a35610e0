"""FisherProxy(reduction="token_mean") under reentrant activation checkpointing (Hugging Face's
``gradient_checkpointing_enable()``): the checkpointed layers run with a graph only when the
backward recomputes them, and then take the token mask of the latest model call. An evaluation
forward of another batch under no_grad between the forward and the backward put its mask there,
so the training batch's examples were weighted by the other batch's token counts. Model calls
without grad record nothing and now leave the mask alone. The reference: per-sentence float64
gradients of each sentence's own token-mean loss, one unpadded sentence at a time."""

import pytest
import torch

import lorambo
from lorambo.sensitivity import FisherProxy

transformers = pytest.importorskip("transformers")

DT = torch.float64
LENGTHS = [6, 2, 4]  # the training batch's sentences, right-padded to 6
MODULES = ["encoder.layer.0.attention.self.value", "encoder.layer.1.output.dense"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _model():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=24, max_position_embeddings=16, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    model = transformers.BertModel(cfg, add_pooling_layer=False).to(DT)
    lorambo.configure_model(model, 2, capacity=4)
    with torch.no_grad():
        for layer in lorambo.lora_layers(model).values():
            layer.lora_B.normal_()
    return model


HEAD = torch.randn(16, 3, generator=torch.Generator().manual_seed(3), dtype=DT)


def _loss(model, ids, mask):
    """A mean over the real tokens of the batch, as Hugging Face's loss with labels."""
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state @ HEAD
    per_token = (out - 1).square().sum(-1)
    return (per_token * mask).sum() / mask.sum()


def test_an_evaluation_forward_before_the_backward_leaves_the_token_weights_alone():
    model = _model()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (len(LENGTHS), 6), generator=g)
    mask = (torch.arange(6) < torch.tensor(LENGTHS)[:, None]).long()
    other_mask = torch.ones_like(mask)
    other_mask[0, 1:] = 0  # another batch of the same shape, with other token counts
    bases = [model.get_submodule(n).base_layer.weight for n in MODULES]
    for w in bases:
        w.requires_grad_(True)
    want = torch.tensor([[float(gr.square().sum()) for gr in torch.autograd.grad(
        _loss(model, ids[n:n + 1, :k], mask[n:n + 1, :k]), bases)] for n, k in enumerate(LENGTHS)], dtype=DT).mean(0)
    for w in bases:
        w.requires_grad_(False)

    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    model.train()
    with FisherProxy(model, modules=MODULES, reduction="token_mean") as fisher:
        loss = _loss(model, ids, mask)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=other_mask)
        loss.backward()
    got = fisher.estimates()
    for i, name in enumerate(MODULES):
        assert got[name].num_probes == len(LENGTHS)
        assert got[name].value == pytest.approx(float(want[i]), rel=1e-9)
