"""The public surface: the verbs and the AMCT names are where users look for them."""

import types

import amct_torch
import amct_torch.export as export_pkg


def test_export_is_both_the_verb_and_the_subpackage():
    assert amct_torch.export is export_pkg
    assert isinstance(amct_torch.export, types.ModuleType) and callable(amct_torch.export)
    assert callable(amct_torch.export.make_reference_evaluator)
    assert callable(amct_torch.export.qdq_to_deploy)


def test_calling_the_export_package_runs_export(monkeypatch):
    seen = {}
    monkeypatch.setattr(export_pkg, "export", lambda *a, **k: seen.setdefault("args", (a, k)))
    amct_torch.export("model", "out/m", "x", record_file="r.txt")
    assert seen["args"] == (("model", "out/m", "x"), {"record_file": "r.txt"})


def test_top_level_names():
    for name in ("quantize", "calibrate", "export", "capture", "fold_batch_norm", "swap_layers", "QuantConfig",
                 "Targeting", "create_quant_config", "quantize_model", "save_model", "CalibrationError"):
        assert hasattr(amct_torch, name), name
