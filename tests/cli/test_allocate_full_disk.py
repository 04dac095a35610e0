"""``lorambo allocate`` into the folder of an earlier run, on a full disk: the earlier run's files
stay together, none of them replaced."""

import errno

import pytest

from lorambo.adapters import atomic
from lorambo.cli import main
from lorambo.experiments.minilm import minilm_path

EARLIER = {"ranks.json": '{"ranks": {"an earlier": 4}}\n', "adapter_config.json": '{"r": 4}\n'}


def test_a_full_disk_replaces_none_of_an_earlier_runs_files(tmp_path, monkeypatch):
    """adapter_config.json failing to write leaves ranks.json as it was too: new ranks beside the
    earlier run's peft config would be read by LoraConfig.from_pretrained as one allocation."""
    out = tmp_path / "o"
    out.mkdir()
    for name, text in EARLIER.items():
        (out / name).write_text(text)
    real = atomic._fsync_file

    def fsync_file(path):  # the disk fills while adapter_config.json is written
        if ".adapter_config.json." in path.name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "_fsync_file", fsync_file)
    with pytest.raises(OSError, match="No space left"):
        main(["allocate", "--model", str(minilm_path()), "--budget", "40000", "--method", "frobenius",
              "--out", str(out), "--target-modules", "query", "--no-heatmap"])
    assert {p.name: p.read_text() for p in out.iterdir()} == EARLIER  # nor any temporary left
