"""LoRAMBoCallback on a model sharded by FSDP2 (2 gloo CPU processes): its first decision crashed
(DTensor pools mixed with plain tensors in the growth statistics), its checkpoint would have been
taken from one process's shards, and with AdaLoRAImportance scoring rank moves the importance
statistics were DTensors that a rank change could not edit. Both processes now take the decisions
one unsharded process takes on the same data, and the checkpoint's adapter rebuilds its model."""

import pytest
import torch

import callback_fsdp2_worker as worker
import fsdp2_worker
from gloo_workers import spawn_two
from rendezvous import start_method
import lorambo

pytest.importorskip("torch.distributed.fsdp")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("moves", [False, True])
def test_callback_under_fsdp2_decides_and_saves_as_one_unsharded_process(tmp_path, moves):
    sharded_dir, plain_dir = tmp_path / "sharded", tmp_path / "plain"
    spawn_two(worker.run, (2, str(tmp_path / "rendezvous"), str(sharded_dir), 3, moves), start_method())
    a, b = (torch.load(sharded_dir / f"rank{r}.pt", weights_only=False) for r in range(2))
    assert a["decisions"] == b["decisions"] and a["ranks"] == b["ranks"]
    assert any(r["event"] == "grow" for r in a["decisions"])
    assert any(r["event"] == "shrink" for r in a["decisions"]) == moves

    whole = [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step]))
             for step in fsdp2_worker.batches(3, 2)]
    reference = fsdp2_worker.build()
    ref_callback = worker.train(reference, whole, str(plain_dir), moves)
    assert [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in ref_callback.decisions] == \
        [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in a["decisions"]]
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(a["state"][name], value, rtol=1e-9, atol=1e-11, msg=name)

    checkpoint = sharded_dir / f"checkpoint-{worker.STEPS}"
    assert sorted(p.name for p in checkpoint.iterdir()) == ["adapter.safetensors", "lorambo_state.pt"]
    torch.manual_seed(0)  # the base weights fsdp2_worker.build() starts from
    rebuilt = lorambo.load_adapter(fsdp2_worker.build_plain(), checkpoint)
    probe = torch.randn(5, 6, generator=torch.Generator().manual_seed(11), dtype=fsdp2_worker.DT)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(probe), reference(probe), rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("moves", [False, True])
def test_callback_under_fsdp2_resumes_as_if_never_stopped(tmp_path, moves):
    """Trainer resuming a sharded run at step 3 (between two decisions): on_train_begin restores
    the decisions (and the importance averages) next to the model and optimizer Trainer reloaded
    through torch.distributed.checkpoint, and both processes end where one unsharded process
    that never stopped ends. on_train_begin under FSDP2 ran in no test before."""
    spawn_two(worker.run_resumed, (2, str(tmp_path / "rendezvous"), str(tmp_path), 3, moves), start_method())
    a, b = (torch.load(tmp_path / f"resumed{r}.pt", weights_only=False) for r in range(2))
    whole = [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step]))
             for step in fsdp2_worker.batches(3, 2)]
    reference = fsdp2_worker.build()
    ref_callback = worker.train(reference, whole, str(tmp_path / "plain"), moves)
    events = lambda records: [(r["layer"], r["event"], r["old_rank"], r["new_rank"]) for r in records]  # noqa: E731
    before = [r for r in ref_callback.decisions if r["step"] < worker.RESUME_AT]
    # with moves, layer 2 gives a rank to layer 0 at step 2; moves go one way per layer, so step 4
    # has none left to make: the resumed run matches only if it took the ways back with the decisions
    assert before and any(r["reason"] == "move" for r in before) == moves
    assert not any(r["step"] >= worker.RESUME_AT for r in ref_callback.decisions)
    for got in (a, b):
        assert events(got["restored"]) == events(before)
        assert events(got["decisions"]) == events(ref_callback.decisions)
        assert got["ranks"] == ref_callback.allocator.current_ranks()
        for name, value in reference.state_dict().items():
            torch.testing.assert_close(got["state"][name], value, rtol=1e-9, atol=1e-11, msg=name)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_callback_under_fsdp2_follows_the_best_model_trainer_loads_at_the_end(tmp_path):
    """``load_best_model_at_end``: Trainer loads the best checkpoint's sharded model (saved at step
    1, before the rank move at step 2) into the trained one; on_train_end then takes that
    checkpoint's decisions, decision log and importance averages on both processes, so they
    describe the model Trainer ends with. _follow_best_model under FSDP2 ran in no test before."""
    spawn_two(worker.run_best_model, (2, str(tmp_path / "rendezvous"), str(tmp_path), 3, True), start_method())
    events = lambda records: [(r["step"], r["layer"], r["event"], r["old_rank"], r["new_rank"])  # noqa: E731
                              for r in records]
    for rank in range(2):
        got = torch.load(tmp_path / f"best{rank}.pt", weights_only=False)
        best, end, followed = got["at_best"], got["at_end"], got["followed"]
        assert any(r["step"] >= worker.BEST_AT for r in end["decisions"])  # ranks moved after the checkpoint
        assert end["ranks"] != best["ranks"]
        assert events(followed["decisions"]) == events(best["decisions"]) == events(followed["log"])
        assert followed["ranks"] == best["ranks"]
        assert followed["state"].keys() == best["state"].keys()
        for name, value in best["state"].items():
            assert torch.equal(followed["state"][name], value), name
        # slot ids are a process's own counter, renumbered when a load rebuilds the pools: the
        # averages must follow the model's slots, whatever their numbers
        assert_same({k: v for k, v in followed["importance"].items() if k != "slot_ids"},
                    {k: v for k, v in best["importance"].items() if k != "slot_ids"}, "importance")
        assert {n: list(ids) for n, ids in followed["importance"]["slot_ids"].items()} == \
            {n: list(ids) for n, ids in followed["slot_ids"].items()}


def assert_same(got, want, where):
    """Equal nested dicts / lists of tensors and plain values, every tensor element."""
    assert type(got) is type(want), where
    if isinstance(want, torch.Tensor):
        assert torch.equal(got, want), where
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for key, value in want.items():
            assert_same(got[key], value, f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want)):
            assert_same(g, w, f"{where}[{i}]")
    else:
        assert got == want, where
