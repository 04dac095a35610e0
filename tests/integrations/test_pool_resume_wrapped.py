"""restore_missed_adapter (Trainer resume) compares a model wrapped by torch.compile with the
adapter file under the plain model's names, as load_adapter loads it."""

import torch

import lorambo
from lorambo.integrations.pool_resume import restore_missed_adapter
from tests.model.tiny_causal_lms import tiny_gpt2


def test_a_compiled_model_is_compared_and_restored_under_the_plain_names(tmp_path):
    torch.manual_seed(0)
    model = lorambo.configure_model(tiny_gpt2(), 2, capacity=4, modules_to_save=["lm_head"])
    lorambo.save_adapter(model, tmp_path)
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    compiled = torch.compile(model)  # not run: only its names matter
    assert restore_missed_adapter(compiled, tmp_path) == []
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
        lorambo.lora_layers(model)["transformer.h.1.mlp.c_fc"].lora_B[:, :2].normal_()
    assert restore_missed_adapter(compiled, tmp_path) == ["transformer.h.1.mlp.c_fc", "lm_head"]
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved[key]), key
