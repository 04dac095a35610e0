"""The copyable example runs end to end at tiny size: Trainer, online growth, checkpoint + resume,
export to peft and reload (peft and lorambo) with the trained logits."""

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("peft")
SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "minilm_sentiment_trainer.py"


@pytest.mark.slow
def test_example_runs_tiny(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("minilm_sentiment_trainer", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    result = example.main(["--out", str(tmp_path), "--steps", "4", "--interrupt-at", "2", "--interval", "2",
                           "--budget", "40000", "--quiet"])
    assert (tmp_path / "trainer" / "checkpoint-2" / "lorambo_state.pt").is_file()
    assert (tmp_path / "peft_adapter" / "adapter_config.json").is_file()
    steps = [e["step"] for e in result["log_history"] if "loss" in e]
    assert steps == [1, 2, 3, 4]  # steps 1-2 come back with the checkpoint, 3-4 from the resumed run
    assert any(d["event"] == "grow" and d["step"] == 2 for d in result["decisions"])
    assert result["lorambo_diff"] <= 1e-6 and result["peft_diff"] <= 1e-5
    assert 0.0 <= result["accuracy"] <= 1.0
    out = capsys.readouterr().out
    assert "trainable params" in out and "held-out accuracy" in out
