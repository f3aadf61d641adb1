"""AMCT's accuracy-based automatic calibration, built on :func:`amct_torch.quant.auto_calibration.auto_calibrate`.

An AMCT script runs unchanged with ``import amct_torch as amct``::

    from amct_torch.common.auto_calibration import AutoCalibrationEvaluatorBase

    class Evaluator(AutoCalibrationEvaluatorBase):
        def calibration(self, model):               # run >= batch_num calibration batches through model
            for x in calibration_batches[:2]:
                model(x)
        def evaluate(self, model):                  # the metric of model (float or fake-quantized)
            return top1(model, val_loader)
        def metric_eval(self, original_metric, new_metric):
            loss = original_metric - new_metric
            return loss * 100 < 0.5, loss           # (good enough?, loss)

    amct.create_quant_config("./tmp/config.json", model, x, skip_layers=[], batch_num=2)
    amct.accuracy_based_auto_calibration(model, Evaluator(), "./tmp/config.json", "./tmp/record.txt",
                                         "./result/model", x, strategy="BinarySearch", sensitivity="CosineSimilarity")

What it writes (AMCT's names):

* ``<save_dir>_fake_quant_model.onnx`` and ``<save_dir>_deploy_model.onnx`` (``save_dir`` is a path prefix,
  like ``save_model``'s ``save_path``) and ``record_file`` (the final model's factors): only when a quantized
  model meets ``metric_eval``;
* in ``save_dir``'s folder: ``accuracy_based_auto_calibration_final_config.json`` (``config_file``'s JSON with
  ``quant_enable`` false for the layers kept in float; only with a model),
  ``accuracy_based_auto_calibration_ranking_info.json`` (``[[layer, score], ...]``, most sensitive first) and
  ``accuracy_based_auto_calibration_record.json`` (the search history: one object per evaluated model with
  ``roll_back_config`` ``{layer: quantized?}`` and ``metric_eval`` ``[ok, loss]``, plus ``metric`` and
  ``seconds``).

Where this differs from AMCT, on purpose: ``config_file`` is read, never rewritten (AMCT rewrites it for
every trial); the history is one JSON list (AMCT concatenates objects, which is not JSON) and lies next to
the ranking instead of in ``./amct_log``; AMCT's samples name the ranking ``..._ranking_info.json`` (its
code ``..._ranking_information.json``): the samples' name is used; when no quantized model meets the
criterion nothing else in the folder is deleted (AMCT removes ``*deploy*`` / ``*fake_quant*`` files there).
The function returns the :class:`~amct_torch.quant.auto_calibration.AutoCalibrationResult` (AMCT returns
nothing). Besides AMCT's ``'BinarySearch'`` and ``'CosineSimilarity'`` it takes ``strategy='Greedy'`` and
``sensitivity='SQNR'``; AMCT's strategy and sensitivity plug-in objects are not supported.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..config import ConfigError, Targeting
from ..config.amct_json import read_quant_json
from ..config.amct_proto import atomic_write_text
from ..config.auto_calibration import AutoCalibrationConfig
from ..config.base import check_range
from ..export.api import export
from ..quant.auto_calibration import AutoCalibrationResult, _jsonable, auto_calibrate
from ._layers import quantizable_layers

__all__ = ["accuracy_based_auto_calibration", "AutoCalibrationEvaluatorBase", "STRATEGIES", "SENSITIVITIES",
           "FILE_NAMES"]

#: AMCT's strategy names -> :class:`AutoCalibrationConfig` ``strategy``
STRATEGIES = {"BinarySearch": "binary", "Greedy": "greedy"}
#: AMCT's sensitivity names -> :class:`AutoCalibrationConfig` ``sensitivity``
SENSITIVITIES = {"CosineSimilarity": "cosine", "SQNR": "sqnr"}
#: the side files, written into ``save_dir``'s folder
FILE_NAMES = {"final_config": "accuracy_based_auto_calibration_final_config.json",
              "ranking": "accuracy_based_auto_calibration_ranking_info.json",
              "record": "accuracy_based_auto_calibration_record.json"}


class AutoCalibrationEvaluatorBase:
    """The evaluator :func:`accuracy_based_auto_calibration` calls back (AMCT's class of the same name).

    Subclass it and implement :meth:`calibration` and :meth:`evaluate`; override :meth:`metric_eval` for
    your criterion. AMCT's base leaves ``metric_eval`` abstract too; here it has a default: the new metric
    may be at most ``max_drop`` (default 0.01, one point of an accuracy in [0, 1]) below the original one.

    Args:
        max_drop: the largest allowed drop for the default :meth:`metric_eval` (``None``: the class
            attribute, 0.01). Subclasses need not call ``super().__init__()``.
    """

    max_drop: float = 0.01

    def __init__(self, max_drop: float | None = None):
        if max_drop is not None:
            check_range(type(self).__name__, "max_drop", float(max_drop), 0.0)
            self.max_drop = float(max_drop)

    def calibration(self, model: nn.Module) -> None:
        """Run the calibration batches through ``model``: at least the config's ``batch_num`` forward passes.

        Also called once with the float model: the layer inputs of those batches rank the layers.
        """
        raise NotImplementedError(f"{type(self).__name__}.calibration(model): implement it to run at least batch_num "
                                  "calibration batches through model")

    def evaluate(self, model: nn.Module) -> Any:
        """The metric of ``model`` (the float model, then fake-quantized ones), e.g. top-1 accuracy."""
        raise NotImplementedError(f"{type(self).__name__}.evaluate(model): implement it to return model's metric "
                                  "on the evaluation data")

    def metric_eval(self, original_metric: Any, new_metric: Any) -> tuple[bool, float]:
        """``(good enough?, loss)``: by default ``loss = original - new`` and good enough when ``loss <= max_drop``."""
        loss = float(original_metric) - float(new_metric)
        return loss <= self.max_drop, loss


def _check_prefix(save_dir: str | os.PathLike) -> Path:
    raw = os.fspath(save_dir)
    prefix = Path(raw)
    if raw.endswith(("/", os.sep)) or (os.altsep and raw.endswith(os.altsep)) or prefix.name == "" or prefix.is_dir():
        raise ValueError(f"save_dir: got {raw!r}; allowed: a directory plus a file-name prefix, e.g. './result/model' "
                         "(AMCT writes <save_dir>_fake_quant_model.onnx and <save_dir>_deploy_model.onnx)")
    return prefix


def _final_config(config_file: str | os.PathLike, result: AutoCalibrationResult) -> str:
    """``config_file``'s JSON with ``quant_enable`` set per searched layer (false: kept in float), as AMCT writes it."""
    with open(os.fspath(config_file), encoding="utf-8") as fh:
        data = json.load(fh)
    fallback = set(result.fallback_layers)
    for name in result.layers:
        data[name]["quant_enable"] = name not in fallback
    return json.dumps(data, indent=4, ensure_ascii=False) + "\n"


def _history(result: AutoCalibrationResult) -> str:
    records = []
    for trial in result.history:
        fallen = set(trial.fallback_layers)
        records.append({"roll_back_config": {n: n not in fallen for n in result.layers},
                        "metric_eval": [trial.ok, _jsonable(trial.loss)],
                        "metric": _jsonable(trial.metric), "seconds": round(trial.seconds, 3)})
    return json.dumps(records, indent=4, ensure_ascii=False) + "\n"


def _ranking(result: AutoCalibrationResult) -> str:
    return json.dumps([[r.name, _jsonable(r.score)] for r in result.ranking], indent=4, ensure_ascii=False) + "\n"


def accuracy_based_auto_calibration(model: nn.Module, model_evaluator: AutoCalibrationEvaluatorBase,
                                    config_file: str | os.PathLike, record_file: str | os.PathLike,
                                    save_dir: str | os.PathLike, input_data: Any, input_names: list[str] | None = None,
                                    output_names: list[str] | None = None, dynamic_axes: dict | None = None,
                                    strategy: str = "BinarySearch",
                                    sensitivity: str = "CosineSimilarity") -> AutoCalibrationResult:
    """Quantize ``model`` as ``config_file`` says, keeping the fewest sensitive layers in float that
    ``model_evaluator.metric_eval`` requires; write the models, the record and the search files.

    Args:
        model: the float model (not modified).
        model_evaluator: an :class:`AutoCalibrationEvaluatorBase` subclass instance.
        config_file: AMCT's PTQ JSON (:func:`amct_torch.create_quant_config`); read, not rewritten.
        record_file: where the final model's factors go.
        save_dir: path prefix of the ONNX models (``./result/model``); its folder gets the side files.
        input_data: example inputs for capture and ONNX export.
        input_names, output_names, dynamic_axes: for ``torch.onnx.export``.
        strategy: ``'BinarySearch'`` (AMCT) or ``'Greedy'`` (one more layer at a time).
        sensitivity: ``'CosineSimilarity'`` (AMCT) or ``'SQNR'``.

    Returns the search result; ``result.success`` is false (and no model or record is written) when only
    the all-float model meets the criterion. Raises ``ValueError`` when ``metric_eval`` rejects the float
    model's metric against itself, :class:`~amct_torch.quant.CalibrationError` when ``calibration`` runs no
    batch or fewer than ``batch_num``.
    """
    if strategy not in STRATEGIES:
        raise ConfigError("accuracy_based_auto_calibration strategy", strategy,
                          "one of " + ", ".join(map(repr, STRATEGIES)))
    if sensitivity not in SENSITIVITIES:
        raise ConfigError("accuracy_based_auto_calibration sensitivity", sensitivity,
                          "one of " + ", ".join(map(repr, SENSITIVITIES)))
    if not isinstance(model_evaluator, AutoCalibrationEvaluatorBase):
        raise TypeError(f"model_evaluator: got {type(model_evaluator).__name__}; allowed: an instance of a subclass of "
                        "amct_torch.common.auto_calibration.AutoCalibrationEvaluatorBase")
    prefix = _check_prefix(save_dir)
    settings, per_layer = read_quant_json(config_file)
    wanted = [n for n, c in per_layer.items() if c is not None]
    known = quantizable_layers(copy.deepcopy(model), input_data)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise ConfigError(f"{Path(config_file).name}: layers", missing,
                          "quantizable layers of this model (see create_quant_config): " + ", ".join(known))
    search = AutoCalibrationConfig(strategy=STRATEGIES[strategy], sensitivity=SENSITIVITIES[sensitivity],
                                   fold_bn=settings.do_fusion, skip_fusion_layers=settings.skip_fusion_layers,
                                   quantize_outputs="none")
    result = auto_calibrate(model, model_evaluator.evaluate, model_evaluator.calibration, input_data,
                            config=Targeting(None, module_name=per_layer), search=search,
                            metric_ok=model_evaluator.metric_eval)
    folder = prefix.parent
    if result.success:
        export(result.model, prefix, input_data, record_file=record_file, input_names=input_names,
               output_names=output_names, dynamic_axes=dynamic_axes)
        atomic_write_text(folder / FILE_NAMES["final_config"], _final_config(config_file, result))
    atomic_write_text(folder / FILE_NAMES["ranking"], _ranking(result))
    atomic_write_text(folder / FILE_NAMES["record"], _history(result))
    if not result.success:
        warnings.warn(f"accuracy_based_auto_calibration: {result.message}; no quantized model was written",
                      RuntimeWarning, stacklevel=2)
    return result
