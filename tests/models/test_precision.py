"""Reduced precision only where the hardware makes it fast: the rule (flags, then a timed product),
the override, one decision per process, the lens recording it, and the choice on this very CPU."""

from __future__ import annotations

import time

import pytest
import torch

from idiom_lens.errors import InputError
from idiom_lens.models import precision
from idiom_lens.models.precision import MIN_SPEEDUP, matmul_precision


@pytest.fixture(autouse=True)
def fresh_choice(monkeypatch):
    """Each test decides anew, without a forced dtype from the environment."""
    monkeypatch.delenv(precision.ENV_OVERRIDE, raising=False)
    precision.forget_choices()
    yield
    precision.forget_choices()


def _never_timed():
    raise AssertionError("no native bf16 in the flags: the timed product must not run")


def test_no_native_bf16_in_the_cpu_flags_means_fp32_untimed(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "fma"}))
    monkeypatch.setattr(precision, "measured_bf16_speedup", _never_timed)
    choice = matmul_precision("cpu", log=lambda s: None)
    assert choice.dtype == torch.float32 and "no native bf16" in choice.reason


@pytest.mark.parametrize(("speedup", "expected"), [(8.0, torch.bfloat16), (1.2, torch.float32), (0.005, torch.float32)])
def test_native_bf16_flags_still_need_a_measured_speedup(monkeypatch, speedup, expected):
    """AMX in the flags, but the process's kernels may be capped (ONEDNN_MAX_CPU_ISA=AVX2): the
    timed product decides."""
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset({"avx2", "amx_bf16", "amx_tile"}))
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda: speedup)
    choice = matmul_precision("cpu", log=lambda s: None)
    assert choice.dtype == expected and "measured" in choice.reason
    assert choice.describe() == {"matmul_dtype": str(expected).removeprefix("torch."),
                                 "matmul_dtype_reason": choice.reason}


def test_unreadable_flags_fall_back_to_the_timed_product(monkeypatch):
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda: 0.5)
    assert matmul_precision("cpu", log=lambda s: None).dtype == torch.float32


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu avx2 amx_bf16\n")
    assert precision.cpu_flags(info) == frozenset({"fpu", "avx2", "amx_bf16"})
    assert precision.cpu_flags(tmp_path / "missing") is None


def test_the_environment_forces_a_dtype_and_a_bad_value_is_named(monkeypatch):
    monkeypatch.setattr(precision, "measured_bf16_speedup", _never_timed)
    monkeypatch.setenv(precision.ENV_OVERRIDE, "bfloat16")
    choice = matmul_precision("cpu", log=lambda s: None)
    assert choice.dtype == torch.bfloat16 and precision.ENV_OVERRIDE in choice.reason
    precision.forget_choices()
    monkeypatch.setenv(precision.ENV_OVERRIDE, "fp8")
    with pytest.raises(InputError, match=f"{precision.ENV_OVERRIDE}='fp8'"):
        matmul_precision("cpu", log=lambda s: None)


def test_decided_once_per_process_and_logged_once(monkeypatch):
    calls, lines = [], []
    monkeypatch.setattr(precision, "cpu_flags", lambda: None)
    monkeypatch.setattr(precision, "measured_bf16_speedup", lambda: calls.append(1) or 3.0)
    first = matmul_precision("cpu", log=lines.append)
    assert matmul_precision(torch.device("cpu"), log=lines.append) is first
    assert len(calls) == 1 and len(lines) == 1 and "bfloat16" in lines[0]


def test_the_lens_trainer_uses_the_choice_and_records_it(tiny_model, monkeypatch):
    from idiom_lens.lenses.corpus import tokenize_sentences
    from idiom_lens.lenses.train import collect_residuals, train_tuned_lens

    rows, _ = collect_residuals(tiny_model, tokenize_sentences(tiny_model, ["the cat sat on the mat"]))
    seen = []
    for forced in ("bfloat16", "float32"):
        precision.forget_choices()
        monkeypatch.setenv(precision.ENV_OVERRIDE, forced)
        lens = train_tuned_lens(tiny_model, rows, steps=2, batch_tokens=4, progress=False, log=seen.append)
        assert lens.settings["matmul_dtype"] == forced
        assert lens.settings["matmul_dtype_reason"] == f"forced by {precision.ENV_OVERRIDE}"
    assert sum("speed-only matrix products" in line for line in seen) == 2  # once per decision


def _seconds(dtype: torch.dtype) -> float:
    a = torch.randn(128, 640).to(dtype)
    b = torch.randn(640, 2048).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return best


def test_the_choice_on_this_cpu_is_not_the_slow_one():
    """On the machine running the suite, with its kernel settings (`make test-avx2` caps them): the
    chosen dtype is no slower than the other on the trainer's product shape (an emulated bf16 is
    100x slower or more; native bf16 about 3x faster with AMX). Fails wherever bf16 is used without the check."""
    choice = matmul_precision("cpu", log=lambda s: None)
    other = torch.float32 if choice.dtype == torch.bfloat16 else torch.bfloat16
    chosen, alternative = _seconds(choice.dtype), _seconds(other)
    # 1.5x: the timing noise of a shared 2-core machine, well inside the gap a wrong choice makes
    assert chosen <= 1.5 * alternative, (choice, chosen, alternative)
    if choice.dtype == torch.bfloat16:
        assert alternative / chosen >= MIN_SPEEDUP / 1.5
