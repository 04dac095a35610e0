"""What lorambo_kernels.config picks for a launch, from shapes, dtype and device alone (the launch
constants themselves wait for GPU measurements; here the choices between them)."""

import types

import pytest
import torch

from lorambo_kernels import config

H100 = (132, (9, 0))
HALF = (torch.bfloat16, torch.float16)


@pytest.fixture
def tf32_switch():
    """Sets torch.backends.cuda.matmul.allow_tf32 (not monkeypatch-able: a property of torch's module
    object), restored afterwards."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32

    def switch(value):
        matmul.allow_tf32 = value

    yield switch
    matmul.allow_tf32 = before


def _answers(device=torch.device("cpu")):
    return config.is_interpreter(), config.sm_count(device), config.capability(device)


def test_plan_for_gpu_answers_for_that_gpu_within_its_block_only(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _answers() == (True, 4, (0, 0))  # the interpreter: small persistent grids, no TMA
    with config.plan_for_gpu(*H100):
        with config.plan_for_gpu(108, (8, 0)):  # an A100 inside: the inner plan answers
            assert _answers() == (False, 108, (8, 0))
        assert _answers() == (False, *H100)
    assert _answers() == (True, 4, (0, 0))


@pytest.fixture
def two_fake_gpus(monkeypatch):
    """torch.cuda answering for an H100 at index 0 and an A100 at index 1, the current device."""
    sms, capabilities = {0: 132, 1: 108}, {0: (9, 0), 1: (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: types.SimpleNamespace(multi_processor_count=sms[index]))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: capabilities[index])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    for cached in (config._sm_count, config._capability):
        cached.cache_clear()
    yield
    for cached in (config._sm_count, config._capability):
        cached.cache_clear()


def test_a_cuda_device_is_asked_for_its_own_sm_count_and_capability(two_fake_gpus):
    assert (config.sm_count(torch.device("cuda", 0)), config.capability(torch.device("cuda", 0))) == (132, (9, 0))
    assert (config.sm_count(torch.device("cuda")), config.capability(torch.device("cuda"))) == (108, (8, 0))


def test_input_precision_follows_the_device_and_torchs_tf32_switch(monkeypatch, tf32_switch):
    """Half precision runs on tensor cores; fp32 is IEEE unless torch's TF32 switch is on; the
    interpreter multiplies bf16 tiles widened to fp32 ("upcast")."""
    with config.plan_for_gpu(*H100):
        for allow_tf32 in (False, True):
            tf32_switch(allow_tf32)
            assert [config.input_precision(d) for d in (*HALF, torch.float32)] == [
                "ieee", "ieee", "tf32" if allow_tf32 else "ieee"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    tf32_switch(True)
    assert [config.input_precision(d) for d in (*HALF, torch.float32)] == ["upcast", "ieee", "ieee"]


@pytest.mark.parametrize("setting, gpu, descriptors, expected", [
    ("auto", H100, True, True), (None, H100, True, True), ("auto", (108, (8, 0)), True, False),
    ("0", H100, True, False), ("off", H100, True, False),          # forced off on the GPU that has it
    ("1", (108, (8, 0)), True, True), ("on", H100, False, False),  # forced on: only with triton's descriptors
])
def test_want_tma_follows_the_setting_the_gpu_and_triton(monkeypatch, setting, gpu, descriptors, expected):
    if setting is None:
        monkeypatch.delenv("LORAMBO_TMA", raising=False)
    else:
        monkeypatch.setenv("LORAMBO_TMA", setting)
    monkeypatch.setattr(config, "tma_available", lambda: descriptors)
    with config.plan_for_gpu(*gpu):
        assert config.want_tma(torch.device("cuda", 0)) is expected
