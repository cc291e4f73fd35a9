"""module.fp8=true (training/fp8.py) is refused, before any work, wherever it cannot run, and each
error names the fix. The FP8 run itself needs an H100-class GPU: benchmarks/gpu_check.sh measures it."""

import sys
import types

import pytest
import torch

from ditkit.objectives import GaussianDiffusion
from ditkit.training import DiffusionModule
from ditkit.training.fp8 import _fp8_eligible, check_fp8


def build(tiny_dit, **options):
    return DiffusionModule(tiny_dit(), GaussianDiffusion(learn_sigma=False), **options)


@pytest.fixture
def h100(monkeypatch):
    """A visible GPU of compute capability 9.0, as far as the checks can tell."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")


@pytest.fixture
def fake_torchao(monkeypatch):
    ao = types.ModuleType("torchao")
    ao.float8 = types.ModuleType("torchao.float8")
    monkeypatch.setitem(sys.modules, "torchao", ao)
    monkeypatch.setitem(sys.modules, "torchao.float8", ao.float8)


def test_fp8_on_cpu_names_the_hardware_and_the_switch(tiny_dit, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(
        RuntimeError, match=r"FP8 tensor cores.*compute capability >= 8\.9.*fp8=false"
    ):
        build(tiny_dit, fp8=True, compile=True)
    build(tiny_dit, fp8=False, compile=True)  # the default trains anywhere


def test_fp8_on_a_gpu_without_fp8_units(tiny_dit, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(RuntimeError, match=r"A100-SXM4-80GB has 8\.0"):
        build(tiny_dit, fp8=True, compile=True)


def test_fp8_without_torchao_names_the_extra(tiny_dit, h100, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # import torchao raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.float8", None)
    with pytest.raises(RuntimeError, match=r"needs torchao.*pip install 'ditkit\[fp8\]'"):
        build(tiny_dit, fp8=True, compile=True)


def test_fp8_needs_compile(tiny_dit, h100, fake_torchao):
    with pytest.raises(ValueError, match="module.fp8=true needs module.compile=true"):
        build(tiny_dit, fp8=True, compile=False)
    build(tiny_dit, fp8=True, compile=True)  # every check passes: conversion waits for the GPU
    with pytest.raises(ValueError, match="set trainer.precision=bf16-mixed"):
        check_fp8(True, "32-true")  # configure_model checks the Trainer's precision
    check_fp8(True, "bf16-mixed")


def test_fp8_layers_are_the_blocks_linears_with_dims_divisible_by_16(tiny_dit):
    """Width 32: the attention, MLP and adaLN linears of each block qualify (32 -> 96, 32 -> 128,
    128 -> 32, 32 -> 192...); a 24-wide layer would not (torch._scaled_mm takes multiples of 16)."""
    model = tiny_dit()
    eligible = [n for n, m in model.blocks.named_modules() if _fp8_eligible(m, n)]
    linears = [n for n, m in model.blocks.named_modules() if isinstance(m, torch.nn.Linear)]
    assert eligible == linears and len(linears) == 2 * 5
    assert not _fp8_eligible(torch.nn.Linear(24, 32), "x")
    assert not _fp8_eligible(torch.nn.LayerNorm(32), "x")
