"""FSDP2 (fully_shard) on 2 gloo CPU processes: online growth, rank moves and rank edits in place on
sharded pools; both processes end identical and compute what one unsharded process computes."""

import pytest
import torch

import fsdp2_worker
from gloo_workers import spawn_two
from rendezvous import start_method
import lorambo

fully_shard = pytest.importorskip("torch.distributed.fsdp").fully_shard


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("optimizer,capacity", [("adam", 4), ("lorambo_adamw", 5), ("adamw_per_parameter", 5)])
def test_fsdp2_rank_edits_match_single_process(tmp_path, optimizer, capacity):
    """With lorambo.optim.AdamW the per-slot step counts must survive fully_shard (capacity 5:
    lora_A's slots split 3/2 over the processes); also with one optimizer per parameter, all
    of them given to every rank change as a list."""
    data_seed = int(torch.randint(0, 2**20, ()))
    spawn_two(fsdp2_worker.run, (2, str(tmp_path / "rendezvous"), str(tmp_path), data_seed, optimizer, capacity),
              start_method())
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2))

    # identical on both processes, storage never replaced
    assert a["decisions"] == b["decisions"] and a["ranks"] == b["ranks"]
    assert a["same_storage"] and b["same_storage"]
    for key in ("state", "opt_state"):
        for name, value in a[key].items():
            if isinstance(value, dict):
                for k, v in value.items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(b[key][name][k])), (name, k)
            else:
                assert torch.equal(value, b[key][name]), name
    assert any(r["event"] == "grow" for r in a["decisions"])
    assert any(r["event"] == "shrink" for r in a["decisions"])
    assert a["ranks"] != {"0": 1, "2": 1}

    # the same function as one process training on both shards' data, unsharded
    whole = [(torch.cat([x for x, _ in step]), torch.cat([y for _, y in step]))
             for step in fsdp2_worker.batches(data_seed, 2)]
    # one optimizer per parameter trains as one optimizer over them all
    ref_optimizer = "lorambo_adamw" if optimizer == "adamw_per_parameter" else optimizer
    ref = fsdp2_worker.procedure(fsdp2_worker.build(capacity), whole, str(tmp_path), write_files=False,
                                 optimizer=ref_optimizer)
    assert [r["layer"] for r in ref["decisions"]] == [r["layer"] for r in a["decisions"]]
    assert [(r["event"], r["old_rank"], r["new_rank"]) for r in ref["decisions"]] == \
        [(r["event"], r["old_rank"], r["new_rank"]) for r in a["decisions"]]
    assert ref["ranks"] == a["ranks"]
    for name, value in ref["state"].items():
        torch.testing.assert_close(a["state"][name], value, rtol=1e-9, atol=1e-11, msg=name)
    if optimizer == "lorambo_adamw":  # per-slot counts kept, and some slot started late
        counts = [s["slot_step"] for s in a["opt_state"].values() if "slot_step" in s]
        assert len(counts) == 4 and any(len(set(c[c > 0].tolist())) > 1 for c in counts), counts
        # torch.distributed.checkpoint saves and restores all of it on each process
        assert a["after_training"] == [] and b["after_training"] == [], (a["after_training"], b["after_training"])
    for i, state in ref["opt_state"].items():
        for k, v in state.items():
            torch.testing.assert_close(torch.as_tensor(a["opt_state"][i][k]), torch.as_tensor(v),
                                       rtol=1e-9, atol=1e-11)
    for key in ("out", "out_merged", "out_unmerged", "out_unloaded", "merged_weight"):
        torch.testing.assert_close(a[key], ref[key], rtol=1e-9, atol=1e-11, msg=key)
    # per-process losses average to the single-process loss
    for step, loss in enumerate(ref["losses"]):
        torch.testing.assert_close((a["losses"][step] + b["losses"][step]) / 2, loss, rtol=1e-9, atol=1e-12)
    assert a["has_lora"] and "unloaded_state_dict" in a["unload_error"]  # in-place unload refused: FSDP units
    assert not ref["has_lora"]
    torch.testing.assert_close(ref["out_unloaded_in_place"], ref["out_unloaded"], rtol=0, atol=1e-12)

    # the adapter written by process 0 rebuilds the trained model in one process
    fresh = fsdp2_worker.build(capacity)
    lorambo.unload(fresh, merge=False)
    lorambo.load_adapter(fresh, tmp_path / "adapter")
    probe = torch.randn(5, 6, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(probe), ref["out"], rtol=1e-9, atol=1e-11)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_meta_init_gives_the_single_process_pools_and_direct_rank_edits_are_refused(tmp_path):
    """Without reset_parameters on DTensor pools, A stayed all zero (with B = 0 nothing trains)."""
    spawn_two(fsdp2_worker.run_meta_init, (2, str(tmp_path / "rendezvous"), str(tmp_path)), start_method())
    a, b = (torch.load(tmp_path / f"meta{r}.pt", weights_only=False) for r in range(2))
    single = fsdp2_worker.build_plain()
    lorambo.configure_model(single, {"0": 2, "2": 3}, capacity={"0": 5, "2": 4})
    for name, layer in lorambo.lora_layers(single).items():
        layer.reset_parameters(generator=torch.Generator().manual_seed(len(name)))
        for pool in ("lora_A", "lora_B"):
            want = getattr(layer, pool).detach()
            assert torch.equal(a["pools"][f"{name}.{pool}"], want) and torch.equal(b["pools"][f"{name}.{pool}"], want)
        assert layer.lora_A[:layer.rank].abs().min() > 0
    for result in (a, b):
        assert "sharded (FSDP2 DTensors)" in result["refused"] and "lorambo.integrations.fsdp" in result["refused"]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_fsdp2_rank_change_without_the_optimizer_warns_as_unsharded(tmp_path):
    """The gathered pools are new Parameters the optimizer holds no state for: the stale-state
    warning of a rank change without the optimizer used to be lost under FSDP2."""
    spawn_two(fsdp2_worker.run_stale_warning, (2, str(tmp_path / "rendezvous"), str(tmp_path)), start_method())
    single = fsdp2_worker.stale_state_warnings(fsdp2_worker.build())
    assert single == [True, False]
    for r in range(2):
        assert torch.load(tmp_path / f"stale{r}.pt", weights_only=False) == single
