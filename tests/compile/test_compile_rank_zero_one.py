"""torch.compile and ranks 0 and 1: what docs/backends.md's *torch.compile* section documents.

Dynamo specialises the sizes 0 and 1, so a rank traced as a (backed) symbolic int guarded
``rank >= 2`` per layer, and a layer reaching rank 0 or 1 recompiled until the recompile limit
(``FailOnRecompileLimitHit`` with ``fullgraph=True``). The layers now read the rank in the graph
(an unbacked SymInt, :func:`lorambo.ops.compile_support.traced_rank`): one graph serves every
rank, 0, 1 and the rest, in any order, forward and backward. Each compiled output is compared
with a float64 reference that does not use lorambo: the plain model with ``W + s B_r A_r`` as
the adapted layers' weights.
"""

import copy
import random

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import BertConfig, BertModel

from lorambo import configure_model, lora_layers

# one layer after another reaches rank 1 and 0 (the shrinks, and growth from an allocation's
# rank-0/1 layers), then everything at 0, at 1, and mixtures with larger ranks
RANKS = [[3, 3, 3, 3], [4, 4, 4, 4], [1, 4, 4, 4], [1, 1, 4, 4], [0, 1, 4, 4], [0, 1, 1, 4], [0, 0, 0, 0],
         [1, 1, 1, 1], [2, 0, 8, 1], [1, 2, 0, 5]]


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
    plain = BertModel(config).eval()
    model = copy.deepcopy(plain)
    configure_model(model, ranks=3, target_modules=["query", "value"], capacity=8)
    return plain, model, lora_layers(model)


def set_ranks(layers, ranks, rng):
    with torch.no_grad():
        for layer, rank in zip(layers.values(), ranks):
            layer.set_rank(rank)
            layer.lora_B[:, :rank].normal_(std=0.2, generator=rng)  # new slots start at B = 0: make them count


def reference(plain, layers, ids):
    """The plain model in float64 with each adapted weight replaced by W + s B_r A_r."""
    ref = copy.deepcopy(plain).double()
    with torch.no_grad():
        for name, layer in layers.items():
            r = layer.rank
            delta = layer.lora_B[:, :r].double() @ layer.lora_A[:r].double() * layer.scaling
            ref.get_submodule(name).weight += delta
        return ref(input_ids=ids).last_hidden_state


@pytest.mark.parametrize("fullgraph", [True, False], ids=["fullgraph", "default"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_ranks_0_1_and_more_share_one_graph(train, fullgraph):
    """With fullgraph=False (torch.compile's default), the rank read broke the graph at every
    layer (the backend refused the ``.item()`` that fullgraph=True lets through) and the rank
    reached the op as an int: recompiles for ranks 0 and 1, and a silent eager fallback past the
    limit. Both settings now give one graph without a break."""
    plain, model, layers = tiny_bert()
    model.train(train)  # no dropout: LoRA's is 0 and BERT's probabilities are 0
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=fullgraph)  # fullgraph: past the limit, an error
    torch._dynamo.utils.counters.clear()
    rng = torch.Generator().manual_seed(1)
    with torch._dynamo.config.patch(recompile_limit=2):
        for ranks in RANKS:
            set_ranks(layers, ranks, rng)
            with torch.set_grad_enabled(train):
                got = compiled(input_ids=ids).last_hidden_state
            torch.testing.assert_close(got.double(), reference(plain, layers, ids), rtol=1e-5, atol=1e-5,
                                       msg=lambda m: f"ranks {ranks}\n{m}")
            if train:  # the backward graph, at the same ranks, against the eager model's gradients
                weights = torch.randn(got.shape, generator=rng)  # got's square sums to 1 per token (LayerNorm)
                grads = torch.autograd.grad((got * weights).sum(), [layer.lora_A for layer in layers.values()])
                want = torch.autograd.grad((model(input_ids=ids).last_hidden_state * weights).sum(),
                                           [layer.lora_A for layer in layers.values()])
                torch.testing.assert_close(grads, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"ranks {ranks}\n{m}")
    assert counter.frame_count == 1
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


def test_random_rank_moves_keep_the_graph():
    plain, model, layers = tiny_bert()
    ids = torch.randint(0, 64, (2, 5))
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    rng, gen = random.Random(0), torch.Generator().manual_seed(2)
    for _ in range(8):  # per-layer ranks anywhere in 0..capacity, as growth, shrinks and moves give
        set_ranks(layers, [rng.randint(0, 8) for _ in layers], gen)
        with torch.no_grad():
            got = compiled(input_ids=ids).last_hidden_state
        torch.testing.assert_close(got.double(), reference(plain, layers, ids), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("inference", [False, True])
def test_rank_tensor_is_a_writable_cpu_int64_scalar_under_inference_mode(inference):
    """Made under torch.inference_mode(), it is still a normal tensor: a later rank change
    outside the mode writes to it (an inference tensor refuses in-place updates)."""
    from lorambo.ops.compile_support import rank_tensor

    with torch.inference_mode(inference):
        t = rank_tensor(3)
    assert not t.is_inference() and t.dtype == torch.int64 and t.device.type == "cpu" and t.dim() == 0
    t.fill_(5)
    assert int(t) == 5
