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


def test_distill_is_both_amct_function_and_the_subpackage(monkeypatch):
    import amct_torch.compat.distill as compat_distill
    import amct_torch.distill as distill_pkg
    assert amct_torch.distill is distill_pkg and callable(amct_torch.distill)
    assert amct_torch.distill.distill_blockwise is amct_torch.distill_blockwise
    seen = {}
    monkeypatch.setattr(compat_distill, "distill", lambda *a, **k: seen.setdefault("args", (a, k)))
    amct_torch.distill("m", "s", "cfg.json", "loader", epochs=2)
    assert seen["args"] == (("m", "s", "cfg.json", "loader"), {"epochs": 2})


def test_amct_import_paths_of_decomposition_distillation_and_auto_calibration():
    from amct_torch.common.auto_calibration import AutoCalibrationEvaluatorBase
    from amct_torch.tensor_decompose import auto_decomposition, decompose_network
    assert amct_torch.AutoCalibrationEvaluatorBase is AutoCalibrationEvaluatorBase
    assert amct_torch.auto_decomposition is auto_decomposition and amct_torch.decompose_network is decompose_network
    for name in ("create_distill_config", "create_distill_model", "save_distill_model", "accuracy_based_auto_calibration",
                 "decompose", "plan_decomposition", "auto_calibrate", "DecomposeConfig", "DistillConfig"):
        assert callable(getattr(amct_torch, name)), name
    assert set(amct_torch.__all__) <= set(dir(amct_torch))
