"""Padded batches of varying batch size and sequence length through a compiled tiny BERT, with
torch.compile's defaults (automatic dynamic shapes, ``fullgraph=False``) and with
``dynamic=True``: at most one recompile (the first call's static graph, then one dynamic one), no
graph break, and every output and LoRA gradient equal to the eager model's in float64.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertConfig, BertModel

from lorambo import configure_model, lora_layers

# (batch, sequence length), each batch padded to its longest sequence; sizes 0 and 1 are left out
# (Dynamo specialises them on any model)
BATCHES = [(2, 5), (3, 7), (4, 9), (2, 11), (5, 6), (3, 3)]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config, add_pooling_layer=False).double()
    configure_model(model, ranks=3, target_modules=["query", "value", "attention.output.dense", "intermediate.dense"],
                    capacity=4)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[:, :3].normal_(std=0.2)  # B = 0 would hide the adapter from the comparison
    return model


def padded_batch(batch, length, generator):
    ids = torch.randint(0, 64, (batch, length), generator=generator)
    lengths = torch.randint(1, length + 1, (batch,), generator=generator)
    lengths[0] = length  # padded to the longest
    mask = (torch.arange(length) < lengths[:, None]).long()
    return ids, mask


def run(model, ids, mask):
    out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    pools = [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5), dtype=out.dtype)  # not the
    # square, which sums to 1 per token after BERT's final LayerNorm: its gradients are rounding noise
    return out, torch.autograd.grad((out * mask[..., None] * weights).sum(), pools)


@pytest.mark.parametrize("dynamic", [None, True], ids=["automatic", "dynamic"])
def test_padded_batches_of_every_shape_share_a_dynamic_graph(dynamic):
    model = tiny_bert()
    eager = copy.deepcopy(model)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, dynamic=dynamic)
    generator = torch.Generator().manual_seed(1)
    frames = []
    for batch, length in BATCHES:
        ids, mask = padded_batch(batch, length, generator)
        out, grads = run(compiled, ids, mask)
        want_out, want_grads = run(eager, ids, mask)
        torch.testing.assert_close(out, want_out, rtol=1e-10, atol=1e-12, msg=lambda m: f"{batch}x{length}\n{m}")
        for i, (g, w) in enumerate(zip(grads, want_grads)):
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=lambda m: f"{batch}x{length}, pool {i}\n{m}")
        frames.append(counter.frame_count)
    # compiled frames after each batch: dynamic=True compiles at the first, automatic dynamic
    # compiles the static graph at the first and the dynamic one at the second, and then nothing
    settled = 1 if dynamic else 2
    assert frames[settled - 1] >= 1 and frames[settled - 1:] == [frames[settled - 1]] * (len(BATCHES) - settled + 1), \
        frames
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
