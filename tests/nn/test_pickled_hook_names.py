"""Whole models saved with ``torch.save(model)`` name the state_dict hooks of each
LoRAMBoLinear by module and name. Files written while the hooks lived in lorambo/nn/lora_linear.py
name them there; unpickling must still find the same hooks (lorambo/nn/state_dict_hooks.py)."""

import pickle

import pytest

from lorambo.nn import state_dict_hooks

HOOKS = ["unmerged_base_weight", "save_slot_ids", "check_extra_state_first", "unmerge_before_load",
         "cover_slots_past_rank"]


@pytest.mark.parametrize("name", HOOKS)
def test_a_hook_named_at_its_old_place_unpickles_to_the_hook(name):
    # protocol-0/2 GLOBAL opcode, as torch.save's pickler writes references to functions
    found = pickle.loads(f"clorambo.nn.lora_linear\n_{name}\n.".encode())
    assert found is getattr(state_dict_hooks, name)
