"""torch.compile and ranks 0 and 1: what the README's *torch.compile* paragraph documents.

Dynamo specialises the sizes 0 and 1, and each op's intermediate ``t = drop(x) A_rᵀ`` has the
rank as a size, so the graph with a symbolic rank guards ``rank >= 2`` per layer. A layer that
reaches rank 0 or 1 after that graph exists (online growth from an allocation's rank-0/1 layers)
compiles a new graph for each new set of layers at rank 0 or 1; with ``fullgraph=True`` the
recompile limit then stops the run (``FailOnRecompileLimitHit``). Ranks kept at 2 or more
(``min_rank=2``) reuse the symbolic graph however they change. Every compiled output is compared
with the eager model's.
"""

import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertConfig, BertModel

import lorambo
from lorambo import configure_model, lora_layers


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tiny_bert():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    configure_model(model, ranks=3, target_modules=["query", "value"], capacity=8)
    return model, list(lora_layers(model).values())


def set_ranks(layers, ranks):
    with torch.no_grad():
        for layer, rank in zip(layers, ranks):
            layer.set_rank(rank)
            layer.lora_B[:, :rank].normal_(std=0.2)  # new slots start at B = 0: make them count


def compiled_matches_eager(model, compiled, ids):
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=ids).last_hidden_state, model(input_ids=ids).last_hidden_state,
                                   rtol=1e-5, atol=1e-5)


def test_ranks_of_two_or_more_reuse_the_symbolic_graph():
    model, layers = tiny_bert()
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    compiled_matches_eager(model, compiled, ids)  # the first graph: every rank a constant
    rng = random.Random(0)
    set_ranks(layers, [4] * len(layers))  # a second value: one graph with a symbolic rank per layer
    compiled_matches_eager(model, compiled, ids)
    graphs = counter.frame_count
    assert graphs == 2
    for _ in range(6):  # per-layer ranks in 2..8, as growth and moves above min_rank=2 give
        set_ranks(layers, [rng.randint(2, 8) for _ in layers])
        compiled_matches_eager(model, compiled, ids)
    assert counter.frame_count == graphs


def test_layers_reaching_rank_zero_or_one_recompile_until_the_limit():
    model, layers = tiny_bert()
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    compiled_matches_eager(model, compiled, ids)
    set_ranks(layers, [4] * len(layers))
    compiled_matches_eager(model, compiled, ids)
    assert counter.frame_count == 2
    # one layer after another drops to rank 1, then to 0: each new set of rank-0/1 layers is a new graph
    steps = [[1, 4, 4, 4], [1, 1, 4, 4], [0, 1, 4, 4], [0, 1, 1, 4]]
    with torch._dynamo.config.patch(recompile_limit=5):
        for n, ranks in enumerate(steps[:3], start=1):
            set_ranks(layers, ranks)
            compiled_matches_eager(model, compiled, ids)
            assert counter.frame_count == 2 + n, ranks
        set_ranks(layers, steps[3])
        with pytest.raises(torch._dynamo.exc.FailOnRecompileLimitHit):
            with torch.no_grad():
                compiled(input_ids=ids)


def test_without_fullgraph_the_limit_falls_back_to_eager():
    model, layers = tiny_bert()
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter)
    with torch._dynamo.config.patch(recompile_limit=3):
        for ranks in ([3, 3, 3, 3], [4, 4, 4, 4], [1, 4, 4, 4], [1, 1, 4, 4], [0, 1, 4, 4]):
            set_ranks(layers, ranks)
            compiled_matches_eager(model, compiled, ids)  # past the limit: the eager model's output
    assert counter.frame_count == 3
