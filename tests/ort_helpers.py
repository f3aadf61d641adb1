"""onnxruntime facts the tests depend on (importable from any test folder)."""

from __future__ import annotations

import platform

import pytest


def int8_dot_saturates() -> bool:
    """True on x86-64 CPUs without VNNI (AVX2 / AVX-512 only). There onnxruntime's u8s8 / s8s8 integer
    kernels (QLinearConv, QLinearMatMul, MatMulInteger, ConvInteger, DynamicQuantizeLSTM, and what its
    optimizer fuses QDQ groups into) sum pairs of 8-bit products in saturating 16-bit lanes
    (``vpmaddubsw``), so their results differ from the ONNX semantics by many quantization steps (the
    "saturation issue" OpenVINO and onnxruntime document; the usual workaround is 7-bit weights)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return not flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


SATURATING_CPU = int8_dot_saturates()


def require_exact_int8_kernels() -> None:
    """Skip the rest of a test that compares onnxruntime's integer kernels bit for bit, on a CPU where
    they saturate (the structural checks before the call have run)."""
    if SATURATING_CPU:
        pytest.skip("onnxruntime's int8 kernels saturate on this CPU (x86-64 without VNNI); their parity is "
                    "checked on VNNI CPUs")
