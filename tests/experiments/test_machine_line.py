"""The machine line that results.json and the demo's summary record: where it ran (the GPU, or
the CPUs and the processor, or the machine type when the processor is not known) and the
1-minute load average at the start and the end, "n/a" where the platform has none."""

import random

from lorambo.experiments import demo_report

ENV = {"cpu_count": 2, "usable_cpus": 2, "platform": "Linux", "torch": "2", "threads": 1, "device": "cpu"}


def test_the_load_averages_at_start_and_end_and_n_a_without_one():
    rng = random.Random(1)
    start, end = rng.uniform(0.5, 9.0), rng.uniform(0.5, 9.0)
    line = demo_report.machine_line(dict(ENV, processor="x86_64"), start, end)
    assert line.endswith(f"1-minute load average {start:.2f} at start, {end:.2f} at end")
    assert demo_report.machine_line(ENV, None, end).endswith(f"n/a at start, {end:.2f} at end")


def test_where_it_ran_names_the_processor_else_the_machine_type_and_a_gpu_first():
    assert ", 2 logical CPUs (x86_64)," in demo_report.machine_line(dict(ENV, processor="x86_64", machine="amd64"),
                                                                     1.0, 1.0)
    assert ", 2 logical CPUs (aarch64)," in demo_report.machine_line(dict(ENV, processor="", machine="aarch64"),
                                                                      1.0, 1.0)
    gpu = demo_report.machine_line(dict(ENV, gpu="NVIDIA H100", processor="x86_64"), 1.0, 1.0)
    assert ", NVIDIA H100, torch 2," in gpu and "CPUs" not in gpu


def test_the_line_starts_with_the_host_name_or_host_without_one(monkeypatch):
    monkeypatch.setattr(demo_report.platform, "node", lambda: "box-7")
    assert demo_report.machine_line(ENV, 1.0, 1.0).startswith("box-7: Linux, ")
    monkeypatch.setattr(demo_report.platform, "node", lambda: "")
    assert demo_report.machine_line(ENV, 1.0, 1.0).startswith("host: Linux, ")
