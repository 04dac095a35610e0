"""``lorambo.integrations.LoRAMBoCallback`` checks the installed transformers' version once: each
lookup read the package metadata again (importlib.metadata.version, about a millisecond), so a
callback that looked the class up every step (``isinstance(cb, lorambo.integrations.LoRAMBoCallback)``)
paid it every step."""

import importlib.metadata

import lorambo.integrations


def test_looking_the_callback_up_again_reads_no_package_metadata(monkeypatch):
    monkeypatch.delitem(vars(lorambo.integrations), "LoRAMBoCallback", raising=False)  # as never looked up
    real, reads = importlib.metadata.version, []
    monkeypatch.setattr(importlib.metadata, "version", lambda name: reads.append(name) or real(name))
    first = lorambo.integrations.LoRAMBoCallback
    assert "transformers" in reads  # the check ran (and importing transformers reads more)
    reads.clear()
    for _ in range(3):
        assert lorambo.integrations.LoRAMBoCallback is first
        from lorambo.integrations import LoRAMBoCallback
        assert LoRAMBoCallback is first
    assert reads == []
