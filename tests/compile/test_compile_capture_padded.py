"""Online growth on a compiled BERT fed padded batches (``capture(step, batch)``, real tokens only),
as docs/backends.md (*Online growth on a compiled model*) documents: with ``fullgraph=False`` (torch.compile's
default) and hook guards on, the compiled run takes the eager run's decisions and ends with the
same weights; with ``fullgraph=True`` the capture's hooks, which record tensors into Python
containers, cannot be traced, and the decision step's forward raises Dynamo's error."""

import warnings

import pytest
import torch
from transformers import BertConfig, BertModel

import lorambo


@pytest.fixture(autouse=True)
def hook_guards():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(skip_nnmodule_hook_guards=False):
        yield
    torch._dynamo.reset()


def batches():
    g = torch.Generator().manual_seed(0)
    out = []
    for lengths in ([5, 3], [4, 2]):  # right-padded to 5 tokens
        ids = torch.randint(1, 64, (2, 5), generator=g)
        mask = (torch.arange(5) < torch.tensor(lengths)[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def train(compile_kwargs):
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
    model = BertModel(config).eval()
    lorambo.configure_model(model, 2, target_modules=["query", "value"], capacity=8)
    alloc = lorambo.LoRAMBoOptimizer(model, total_budget=8 * 64 * 2, warmup_steps=1, interval=1,
                                     sketch_rank=2, seed=0)
    opt = alloc.make_optimizer(lr=1e-2)
    run = model if compile_kwargs is None else torch.compile(model, backend="aot_eager", **compile_kwargs)
    data = batches()
    weights = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        batch = data[step % 2]
        with alloc.capture(step, batch):
            out = run(**batch).last_hidden_state  # its square sums to 1 per token after BERT's LayerNorm
            (out * batch["attention_mask"][..., None] * weights).sum().backward()
        alloc.step(step, optimizer=opt)
        opt.step()
        opt.zero_grad()
    weights = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    return alloc.decisions, alloc.current_ranks(), weights


def test_compiled_without_fullgraph_decides_as_eager_on_padded_batches():
    decisions, ranks, weights = train(None)
    assert decisions  # the run grows ranks: something to compare
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no skipped decision
        got = train({})
    assert got[0] == decisions and got[1] == ranks
    for name, value in weights.items():
        torch.testing.assert_close(got[2][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fullgraph_cannot_trace_the_capture():
    with pytest.raises((torch._dynamo.exc.Unsupported, torch._dynamo.exc.UserError)):
        train({"fullgraph": True})
