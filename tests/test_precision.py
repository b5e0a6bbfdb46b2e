"""precision=auto: bf16 only where the device computes it natively (no timing here: the detection logic)."""

import logging
from pathlib import Path

import pytest
import torch
import yaml

from dpokit import config, precision

ROOT = Path(__file__).resolve().parents[1]
AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c"}  # e.g. a Zen 2 / Haswell server
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512bw", "avx512_bf16", "avx512_vnni"}  # e.g. Zen 4 / Cooper Lake
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}  # e.g. Sapphire Rapids


@pytest.fixture(autouse=True)
def fresh_resolution():
    precision.resolve.cache_clear()
    yield
    precision.resolve.cache_clear()


@pytest.mark.parametrize("flags, native", [(AVX2_ONLY, False), (AVX512_BF16, True), (AMX, True), (set(), False)])
def test_cpu_flags_decide_native_bf16(flags, native):
    assert precision.cpu_native_bf16(flags)[0] is native


@pytest.mark.parametrize(
    "isa, native",
    [
        (None, True),
        ("", True),
        ("AVX2", False),
        ("avx512_core", False),
        ("AVX512_CORE_BF16", True),
        ("avx512_core_amx", True),
        ("ALL", True),
    ],
)
def test_onednn_cap_below_bf16_kernels_is_not_native(isa, native):
    assert precision.cpu_native_bf16(AVX512_BF16, isa)[0] is native


def test_cpu_flags_are_read_from_the_kernel():
    flags = precision.cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert flags and all(isinstance(f, str) and f == f.strip() for f in flags)


@pytest.mark.parametrize("flags, expected", [(AVX2_ONLY, "fp32"), (AVX512_BF16, "bf16"), (AMX, "bf16")])
def test_auto_resolves_by_cpu_flags_and_logs_one_line(monkeypatch, caplog, flags, expected):
    monkeypatch.setattr(precision, "cpu_flags", lambda: flags)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with caplog.at_level(logging.INFO, logger="dpokit"):
        assert precision.resolve("auto", "cpu") == expected
        assert precision.resolve("auto", "cpu") == expected  # asked again: answered from the cache, no log
    lines = [r.getMessage() for r in caplog.records if "precision auto" in r.getMessage()]
    assert len(lines) == 1 and f"-> {expected} on cpu" in lines[0]


def test_explicit_bf16_on_an_emulating_cpu_warns_once_with_a_measured_ratio(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    monkeypatch.setattr(precision, "bf16_slowdown", lambda device: 70.0)
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        for _ in range(3):
            assert precision.resolve("bf16", "cpu") == "bf16"  # honoured
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "avx512_bf16" in warnings[0] and "70.0x slower" in warnings[0] and "precision=auto" in warnings[0]


def test_explicit_bf16_on_a_native_cpu_and_fp32_anywhere_say_nothing(monkeypatch, caplog):
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX512_BF16)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with caplog.at_level(logging.INFO, logger="dpokit"):
        assert precision.resolve("bf16", "cpu") == "bf16"
        assert precision.resolve("fp32", "cpu") == "fp32"
    assert not caplog.records


def test_cuda_follows_the_gpu_bf16_support(monkeypatch):
    for supported, expected in ((True, "bf16"), (False, "fp32")):
        precision.resolve.cache_clear()
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda supported=supported: supported)
        assert precision.resolve("auto", "cuda", 0) == expected


def test_autocast_of_the_loop_follows_auto(monkeypatch):
    from dpokit.train.runtime import autocast

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "cpu_flags", lambda: AVX2_ONLY)
    with autocast(cpu, "auto"):
        assert not torch.is_autocast_enabled("cpu")
    precision.resolve.cache_clear()
    monkeypatch.setattr(precision, "cpu_flags", lambda: AMX)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    with autocast(cpu, "auto"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_slowdown_measurement_leaves_the_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    assert precision.bf16_slowdown(torch.device("cpu"), n=16, repeats=1) > 0
    assert torch.equal(before, torch.get_rng_state())


def test_config_lists_match_and_auto_is_the_default():
    from dpokit.commands.dpo import DPOConfig
    from dpokit.commands.evaluate import EvalConfig
    from dpokit.commands.generate import GenerateConfig

    assert config.PRECISIONS == precision.PRECISIONS
    for cls in (DPOConfig, EvalConfig, GenerateConfig):
        assert cls.__dataclass_fields__["precision"].default == "auto"


def test_shipped_configs_never_hard_code_bf16():
    files = [*ROOT.glob("configs/*.yaml"), *ROOT.glob("examples/**/*.yaml")]
    assert files
    for f in files:
        value = (yaml.safe_load(f.read_text()) or {}).get("precision")
        # fp32 is exact everywhere (the sweep's evaluation pins it); bf16 would crawl on CPUs without it
        assert value in (None, "auto", "fp32"), f"{f}: precision {value}"
