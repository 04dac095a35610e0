"""A plain training loop saved and resumed through LoRAMBoOptimizer.state_dict / load_state_dict
continues exactly as the uninterrupted run: losses, pools, Adam state, decisions and the log."""

import pytest
import torch

import lorambo
from lorambo.allocation.report import read_decisions
from lorambo.optimizer import LoRAMBoOptimizer

from residual_net import ResidualNet, mse

DT = torch.float64
STEPS, SAVE_AT, CRASH_AT = 14, 6, 9

pytestmark = pytest.mark.usefixtures("one_thread")


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(12, 8, generator=g, dtype=DT), torch.randn(12, 8, generator=g, dtype=DT))
            for _ in range(STEPS + 2)]


DATA = _data()


def _base():
    torch.manual_seed(0)
    return ResidualNet()


def _allocator(model, log_path):
    return LoRAMBoOptimizer(model, 500, sensitivity_method="gradient", initial_budget=300, warmup_steps=2,
                            interval=3, sketch_rank=1, move_threshold=1e3, heldout_batches=DATA[-2:], loss_fn=mse,
                            log_path=log_path)


def _train(model, opt, torch_opt, steps):
    losses = []
    for step in steps:
        with opt.capture(step):
            loss = mse(model, DATA[step])
            loss.backward()
        losses.append(loss.item())
        opt.step(step)
        torch_opt.step()
        torch_opt.zero_grad()
    return losses


def _start(log_path):
    model = _base()
    opt = _allocator(model, log_path)
    opt.compute_optimal_ranks(DATA[:2], mse)
    opt.configure()
    return model, opt, opt.make_optimizer(lr=2e-2)


def test_resume_in_a_fresh_allocator_matches_the_uninterrupted_run(tmp_path):
    model, opt, torch_opt = _start(tmp_path / "ref.jsonl")
    ref_losses = _train(model, opt, torch_opt, range(STEPS))
    assert {r["step"] for r in opt.decisions} > {2, 5}  # decisions before and after the save
    assert any(r["step"] > SAVE_AT for r in opt.decisions)

    log = tmp_path / "run.jsonl"
    model, opt, torch_opt = _start(log)
    losses = _train(model, opt, torch_opt, range(SAVE_AT))
    lorambo.save_adapter(model, tmp_path / "ckpt")
    torch.save(opt.state_dict(), tmp_path / "ckpt" / "lorambo.pt")
    _train(model, opt, torch_opt, range(SAVE_AT, CRASH_AT))  # logged past the save, then lost

    model = lorambo.load_adapter(_base(), tmp_path / "ckpt")  # a fresh process
    opt = _allocator(model, log)
    torch_opt = opt.make_optimizer(lr=2e-2)
    opt.load_state_dict(torch.load(tmp_path / "ckpt" / "lorambo.pt", weights_only=True))
    losses += _train(model, opt, torch_opt, range(SAVE_AT, STEPS))

    ref_model, ref_opt, ref_torch_opt = _start(tmp_path / "ref2.jsonl")
    _train(ref_model, ref_opt, ref_torch_opt, range(STEPS))
    assert losses == ref_losses
    assert opt.decisions == ref_opt.decisions
    assert read_decisions(log) == ref_opt.decisions
    assert opt.current_ranks() == ref_opt.current_ranks()
    for (name, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    got, want = torch_opt.state_dict(), ref_torch_opt.state_dict()
    assert got["state"].keys() == want["state"].keys()
    for k, s in want["state"].items():
        for key, v in s.items():
            assert torch.equal(torch.as_tensor(got["state"][k][key]), torch.as_tensor(v)), (k, key)
    assert opt.ranks == ref_opt.ranks and opt.capacities == ref_opt.capacities
    assert opt.sensitivities == ref_opt.sensitivities


def _saved(tmp_path):
    model, opt, torch_opt = _start(tmp_path / "saved.jsonl")
    _train(model, opt, torch_opt, range(SAVE_AT))
    lorambo.save_adapter(model, tmp_path / "ckpt")
    return opt.state_dict()


@pytest.mark.parametrize("change,message", [
    (dict(total_budget=600), r"other settings .*'total_budget': \(500, 600\)"),
    (dict(seed=1), r"other settings .*'seed': \(0, 1\)"),
    (dict(target_modules=["blocks.0.up", "blocks.1.up"]), r"only saved: \['blocks.0.down', 'blocks.1.down'\]"),
])
def test_a_state_for_another_setup_is_refused_before_anything_changes(tmp_path, change, message):
    state = _saved(tmp_path)
    model = lorambo.load_adapter(_base(), tmp_path / "ckpt")
    log = tmp_path / "other.jsonl"
    log.write_text('{"step": 0}\n')
    kwargs = dict(sensitivity_method="gradient", initial_budget=300, warmup_steps=2, interval=3, sketch_rank=1,
                  move_threshold=1e3, heldout_batches=DATA[-2:], loss_fn=mse, log_path=log)
    total = change.pop("total_budget", 500)
    opt = LoRAMBoOptimizer(model, total, **{**kwargs, **change})
    torch_opt = opt.make_optimizer(lr=2e-2)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(state)
    assert opt.decisions == [] and opt.ranks is None and log.read_text() == '{"step": 0}\n'
    assert torch_opt.state_dict()["state"] == {}


def test_a_model_without_the_saved_ranks_is_refused(tmp_path):
    state = _saved(tmp_path)
    model, opt, torch_opt = _start(tmp_path / "fresh.jsonl")  # configured, but not loaded
    with pytest.raises(ValueError, match=r"ranks differ from the saved ones .*'blocks.0.up': \(4, 2\)"):
        opt.load_state_dict(state)
    assert opt.decisions == [] and torch_opt.state_dict()["state"] == {}


def test_the_optimizer_state_needs_make_optimizer_first(tmp_path):
    state = _saved(tmp_path)
    opt = _allocator(lorambo.load_adapter(_base(), tmp_path / "ckpt"), None)
    with pytest.raises(ValueError, match=r"call opt.make_optimizer\(...\) before load_state_dict"):
        opt.load_state_dict(state)
    assert opt.decisions == []


def test_state_dict_between_capture_and_step_is_refused(tmp_path):
    model, opt, torch_opt = _start(None)
    with opt.capture(2):
        mse(model, DATA[2]).backward()
    with pytest.raises(RuntimeError, match=r"after opt.step\(step\)"):
        opt.state_dict()
    assert opt.step(2)  # the captured step is still there


def test_numpy_settings_still_load_with_weights_only(tmp_path):
    """numpy numbers the constructor accepts (np.int64 interval, np.float64 threshold) would
    make torch.load(weights_only=True) refuse the saved state."""
    import numpy as np

    model = _base()
    opt = LoRAMBoOptimizer(model, np.int64(500), sensitivity_method="gradient", initial_budget=300,
                           warmup_steps=np.int64(2), interval=np.int64(3), sketch_rank=1, max_rank=np.int64(8),
                           move_threshold=np.float64(1e3), heldout_batches=DATA[-2:], loss_fn=mse)
    opt.compute_optimal_ranks(DATA[:2], mse)
    opt.configure()
    _train(model, opt, opt.make_optimizer(lr=2e-2), range(SAVE_AT))
    torch.save(opt.state_dict(), tmp_path / "lorambo.pt")
    state = torch.load(tmp_path / "lorambo.pt", weights_only=True)
    assert state["decisions"] == opt.decisions and state["settings"]["interval"] == 3
    opt.load_state_dict(state)


def test_alora_rounds_done_survive_a_resume_and_the_next_save():
    def alora(model):
        return LoRAMBoOptimizer(model, 600, allocation="alora", initial_budget=600, heldout_batches=DATA[-2:],
                                loss_fn=mse, alora=dict(k1=1, k2=2, rounds=3, n_prune=1))

    torch.manual_seed(0)
    model = ResidualNet()
    opt = alora(model)
    opt.compute_optimal_ranks(DATA[:2], mse)  # uniform: ALoRA's start
    opt.configure()
    torch_opt = opt.make_optimizer(lr=2e-2)
    _train(model, opt, torch_opt, range(4))  # rounds at steps 1 and 3
    state = opt.state_dict()
    assert state["alora_rounds_done"] == 2
    resumed = alora(model)
    resumed.make_optimizer(lr=2e-2)
    resumed.load_state_dict(state)
    assert resumed.alora_schedule().rounds_done == 2
    assert resumed.state_dict()["alora_rounds_done"] == 2
