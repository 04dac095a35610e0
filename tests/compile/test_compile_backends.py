"""torch.compile(fullgraph=True) of a tiny BERT with LoRAMBoLinear layers on every CPU backend.

For ``torch``, ``ext`` and ``triton`` (kernels under TRITON_INTERPRET=1): no graph break, the
compiled model equals the eager one (outputs and LoRA gradients, in eval mode and in train mode
with dropout under the same manual_seed), and sweeping the rank over 0..capacity compiles one
graph, with the rank read in the graph, for all of them (no recompile per rank or rank bucket).

The ``aot_eager`` backend runs Dynamo and AOTAutograd (fake tensors, the custom ops' fake
implementations, the backward graph) without Inductor's C++ compile: what decides whether the
model traces, at a fraction of the time.
"""

import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertConfig, BertModel

import lorambo
from lorambo import configure_model, lora_layers
from lorambo.ext import loader as ext_loader

if ext_loader.load() is None and os.environ.get("LORAMBO_REQUIRE_EXT") == "1":
    raise RuntimeError("LORAMBO_REQUIRE_EXT=1 but lorambo._C is not available")

# backend: (capacity, hidden layers); the interpreter is slow, so triton gets the smaller pool
CASES = {"torch": (16, 1), "ext": (16, 1), "triton": (4, 1)}


@pytest.fixture(params=list(CASES))
def compile_backend(request):
    name = request.param
    if name == "ext" and ext_loader.load() is None:
        pytest.skip("compiled extension not built (CI builds it and sets LORAMBO_REQUIRE_EXT=1)")
    if name == "triton":
        pytest.importorskip("triton")
        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("the CPU check of the triton backend runs under TRITON_INTERPRET=1")
    lorambo.set_backend(name)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield name
    torch._dynamo.reset()


def tiny_bert(layers, capacity, dropout):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config)
    configure_model(model, ranks=1, target_modules=["query", "value"], capacity=capacity, dropout=dropout)
    return model


def set_rank_everywhere(model, rank):
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.set_rank(rank)
            layer.lora_B[:, :rank].normal_(std=0.2)  # new slots start at B = 0: make them count


def lora_params(model):
    return [p for layer in lora_layers(model).values() for p in (layer.lora_A, layer.lora_B)]


def run(model, ids):
    """last_hidden_state and the LoRA gradients of a fixed random weighting of it (its mean square
    is 1 after BERT's final LayerNorm, whose gradients are rounding noise)."""
    out = model(input_ids=ids).last_hidden_state
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=out.dtype)
    grads = torch.autograd.grad((out * weights).sum(), lora_params(model))
    return out, grads


def assert_same(got, want, what):
    out, grads = got
    out_e, grads_e = want
    torch.testing.assert_close(out, out_e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: output\n{m}")
    for i, (g, e) in enumerate(zip(grads, grads_e)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: grad {i}\n{m}")


def no_graph_breaks():
    return sum(torch._dynamo.utils.counters["graph_break"].values()) == 0


def test_compiled_bert_matches_eager_over_ranks_and_with_dropout(compile_backend):
    capacity, layers = CASES[compile_backend]
    model = tiny_bert(layers, capacity, dropout=0.3).eval()
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)  # a graph break raises

    # eval: every rank 0..capacity on one compiled model
    for rank in range(0, capacity + 1):
        set_rank_everywhere(model, rank)
        got = run(compiled, ids)
        if rank in (0, 1, 2, capacity):  # the sizes Dynamo would specialise, the first other, the last
            assert_same(got, run(model, ids), f"rank {rank}")
        else:  # the output shows the rank is not stale; eager forward only (the interpreter is slow)
            with torch.no_grad():
                want = model(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got[0], want, rtol=1e-4, atol=1e-5, msg=lambda m: f"rank {rank}\n{m}")
    # the rank is an unbacked SymInt read in the graph (lorambo.ops.compile_support.traced_rank):
    # one graph for every rank, 0 and 1 included
    assert counter.frame_count == 1
    eval_out = got[0]

    # train: LoRA dropout on; the seeds are drawn in the graph from torch's generator
    model.train()
    torch.manual_seed(7)
    got = run(compiled, ids)
    torch.manual_seed(7)
    assert_same(got, run(model, ids), "train with dropout")
    assert not torch.allclose(got[0], eval_out)  # the dropout did drop something
    assert not torch.allclose(run(compiled, ids)[0], got[0])  # a fresh mask per call, none frozen in the graph
    assert counter.frame_count == 2  # + the train-mode graph
    assert no_graph_breaks(), dict(torch._dynamo.utils.counters["graph_break"])


def test_set_backend_retraces_a_compiled_layer():
    """The backend is a constant of the compiled graph, guarded: set_backend takes effect at the
    next call of an already compiled model (one recompile), with the new backend's op in the graph."""
    if ext_loader.load() is None:
        pytest.skip("compiled extension not built (CI builds it and sets LORAMBO_REQUIRE_EXT=1)")
    torch._dynamo.reset()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    layer = lorambo.LoRAMBoLinear(torch.nn.Linear(12, 10), rank=3, capacity=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    compiled = torch.compile(layer, backend=record, fullgraph=True)
    lorambo.set_backend("torch")
    want = layer(x)
    torch.testing.assert_close(compiled(x), want)
    lorambo.set_backend("ext")
    torch.testing.assert_close(compiled(x), want, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 2
    assert "lorambo_ref.lora_linear_fwd" in graphs[0] and "lorambo_ext.lora_linear_fwd" in graphs[1]
