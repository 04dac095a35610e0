"""``model.generate`` on an adapted causal LM decodes as the plain model whose weights hold
W + s B_r A_r, computed in float64: the same tokens and the same scores under greedy search with
and without the KV cache, with a static cache, and under beam search. Decode steps feed the
layers one row per sequence (or per beam), the op's smallest inputs. (The Triton kernels have no
float64; their M = 1 and tiny shapes are tested against float64 in tests/kernels.)"""

import copy

import pytest
import torch

from lorambo import configure_model, lora_layers

from tiny_causal_lms import tiny_gpt2, tiny_llama

DT = torch.float64
SEARCHES = {"greedy": {}, "no cache": {"use_cache": False}, "static cache": {"cache_implementation": "static"},
            "beam search": {"num_beams": 3}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _adapted_and_reference(build):
    torch.manual_seed(0)
    base = build().to(DT).eval()
    model = configure_model(copy.deepcopy(base), ranks=4, capacity=8, alpha=8.0).eval()
    layers = list(lora_layers(model).values())
    layers[0].set_rank(1)
    layers[1].set_rank(8)  # the whole pool
    with torch.no_grad():
        for layer in layers:
            layer.lora_B[:, :layer.rank].normal_(std=0.5)
    reference = copy.deepcopy(base)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            r = layer.rank
            delta = layer.scaling * layer.lora_B[:, :r] @ layer.lora_A[:r]  # [out, in], float64
            modules[name].weight += delta if layer.base_kind == "linear" else delta.t()
    return model, reference


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_generate_equals_the_merged_float64_model(backend, build):
    model, reference = _adapted_and_reference(build)
    ids = torch.randint(1, 63, (2, 5), generator=torch.Generator().manual_seed(1))
    for search, settings in SEARCHES.items():
        outputs = [m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True,
                              **settings) for m in (model, reference)]
        got, want = outputs
        assert torch.equal(got.sequences, want.sequences), search
        assert len(got.logits) == len(want.logits) == 5
        for g, w in zip(got.logits, want.logits):
            assert g.dtype == w.dtype == torch.float32  # transformers returns float32 logits
            assert float(w.abs().max()) > 0.1
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-6, msg=search)
