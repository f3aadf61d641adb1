"""Accuracy-based automatic calibration: quantize everything, rank the layers, fall back the fewest.

    from amct_torch.quant.auto_calibration import auto_calibrate

    result = auto_calibrate(model, lambda m: evaluate_accuracy(m, val_loader), calib_loader, x,
                            config=QuantConfig(weight_bits=4), max_drop=0.003)
    print(result.table())
    result.model             # the calibrated model: quantize(model, result.targeting, x) + calibrate
    result.fallback_layers   # ('layer3.2.conv2',)
    result.write("out/autocal")

The algorithm is AMCT's (``accuracy_based_auto_calibration``):

1. evaluate the float model; the criterion must accept the float metric against itself;
2. quantize every layer the config targets (``quantize`` + calibration) and evaluate it;
3. rank the quantized layers by sensitivity, most sensitive first. Float inputs of every layer are taken
   from calibration batches run through the BN-folded float model; on those same inputs each layer's
   quantized wrapper alone (quantized input and weights) is compared with the float layer: cosine
   similarity of the two outputs (AMCT's ``CosineSimilarity``) or their SQNR in dB. AMCT dumps the layer
   inputs and compares single-op fake-quant with single-op float the same way;
4. if the fully quantized model misses the criterion, search the fewest worst-ranked layers to fall back
   (to float, or to a higher-precision :class:`QuantConfig`): bisection over their number (``binary``,
   AMCT's ``BinarySearch``, assuming more fallback never hurts) or one layer more at a time (``greedy``).
   When only *every* layer in float would do, there is no quantized model (AMCT produces none either);
   with a higher-precision fallback the all-fallback model is tried before giving up.

Each trial quantizes and calibrates the model afresh with the trial's targeting rather than switching
quantizers off in the one calibrated model: calibration runs with fake-quantized weights, so the factors
of the layers after a fallen-back one depend on whether it is quantized, and a model patched from the
fully quantized one would not be the model the final config describes. The final model therefore *is*
``quantize(model, result.targeting, x)`` calibrated (the accepted trial's own model, kept), and what
``export`` writes from it matches the config written next to it. Only the fp32 metric and the ranking
are computed once. Trials cost one ``quantize`` (graph capture, BN folding), ``batch_num`` calibration
batches and one evaluation each.

``calibration_data`` is either batches (a DataLoader, a list of tensors, ``(x, y)`` tuples: ``x`` is
used) or a function that runs the calibration batches through the model it is given (what AMCT's
evaluator ``calibration(model)`` does); the same data feeds the sensitivity ranking.
"""

from __future__ import annotations

import abc

import copy
import json
import math
import numbers
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from ..config import ConfigError, QuantConfig, Targeting
from ..config.amct_json import AmctGlobal, quant_json_dict
from ..config.amct_proto import atomic_write_text
from ..config.auto_calibration import AutoCalibrationConfig
from ..graph import fold_batch_norm
from ..graph.plan import render_table
from .adaround import AdaRoundWeightQuantizer
from .ptq import (_adaround, _batches, activation_quantizers, calibrate, check_calibrated, quant_layers, quantize,
                  weight_quantizer)
from .quantizers import CalibrationError

__all__ = ["auto_calibrate", "layer_sensitivity", "AutoCalibrationResult", "LayerSensitivity", "SearchTrial",
           "with_fallback", "FILE_NAMES"]

Status = Literal["quantized", "fallback", "no_model", "failed"]

#: what :meth:`AutoCalibrationResult.write` writes into its directory
FILE_NAMES = {"final_config": "auto_calibration_final_config.json",
              "final_targeting": "auto_calibration_final_targeting.yaml",
              "ranking": "auto_calibration_ranking.json",
              "history": "auto_calibration_history.json"}

#: SQNR values are clipped to +-this (dB): a layer quantized without any error would otherwise score +inf
SQNR_CAP_DB = 300.0


# -- results ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerSensitivity:
    """One layer's line in the ranking: ``rank`` 1 is the most sensitive (the lowest score)."""

    rank: int
    name: str
    layer_type: str
    score: float


@dataclass(frozen=True)
class SearchTrial:
    """One evaluated model of the search: which layers fell back, its metric and the criterion's verdict.

    Trial 0 is the fully quantized model. ``loss`` is the second value of a ``metric_ok`` that returns
    ``(ok, loss)`` (AMCT's ``metric_eval``), or ``fp32_metric - metric`` with ``max_drop``.
    """

    index: int
    fallback_layers: tuple[str, ...]
    metric: Any
    ok: bool
    loss: Any
    seconds: float


@dataclass
class AutoCalibrationResult:
    """What :func:`auto_calibrate` found.

    Attributes:
        model: the final calibrated model (``quantize(model, targeting, x)`` + calibration), or ``None``
            when no quantized model meets the criterion (``status`` ``no_model`` or ``failed``).
        status: ``quantized`` (every layer quantized meets the criterion), ``fallback`` (some layers fell
            back), ``no_model`` (only the all-float model meets it, or no layer could fall back: AMCT
            produces no model either), ``failed`` (even every layer at the fallback precision misses it).
        fallback_layers: the layers kept in float (or at the fallback precision), most sensitive first.
        layers: the layers the search could fall back (every quantized layer; with a higher-precision
            fallback, those not already at that config), in model order.
        ranking: every one of them with its score, most sensitive first.
        history: every evaluated model, the fully quantized one first.
        fp_metric, quant_metric, final_metric: the float, fully quantized and final models' metrics.
        targeting: the final config as a :class:`Targeting` (the base one plus the fallback layers as
            ``skip`` entries, or as ``module_name`` entries with the fallback config); ``None`` without a model.
        layer_configs: every candidate layer's final config (``None``: float), in model order.
        settings: the search settings used.
        seconds: wall time of the whole search, evaluations included.
        message: one line saying what happened.
    """

    model: nn.Module | None
    status: Status
    fallback_layers: tuple[str, ...]
    layers: tuple[str, ...]
    ranking: list[LayerSensitivity]
    history: list[SearchTrial]
    fp_metric: Any
    quant_metric: Any
    final_metric: Any
    targeting: Targeting | None
    layer_configs: dict[str, QuantConfig | None]
    settings: AutoCalibrationConfig
    seconds: float
    message: str
    amct_settings: AmctGlobal = field(default_factory=AmctGlobal)

    @property
    def success(self) -> bool:
        """True when there is a quantized model that meets the criterion."""
        return self.status in ("quantized", "fallback")

    # -- views ---------------------------------------------------------------------------------------
    def _final_of(self, name: str) -> str:
        if not self.success:
            return "-"
        cfg = self.layer_configs.get(name)
        if name in self.fallback_layers:
            return "float" if cfg is None else f"fallback {cfg.short()}"
        return "quantized"

    def table(self) -> str:
        """The summary, the ranking and the search history as fixed-width text."""
        unit = "cosine" if self.settings.sensitivity == "cosine" else "SQNR dB"
        n = len(self.ranking)
        head = [f"auto calibration: {self.settings.short()}",
                f"{self.message}",
                f"fp32 {_fmt(self.fp_metric)} | all quantized {_fmt(self.quant_metric)}"
                f" ({'ok' if self.history and self.history[0].ok else 'not ok'})"
                f" | final {_fmt(self.final_metric) if self.success else '-'}"
                f" | {len(self.fallback_layers)} of {n} layers fall back | {len(self.history)} models evaluated,"
                f" {self.seconds:.1f} s"]
        ranking = render_table(["rank", "layer", "type", unit, "final"],
                               [(r.rank, r.name, r.layer_type, _fmt_score(r.score, self.settings.sensitivity),
                                 self._final_of(r.name)) for r in self.ranking])
        history = render_table(["trial", "fallback", "metric", "ok", "loss", "seconds"],
                               [(t.index, _fmt_layers(t.fallback_layers), _fmt(t.metric), "yes" if t.ok else "no",
                                 _fmt(t.loss), f"{t.seconds:.2f}") for t in self.history])
        return "\n".join(head + ["", "ranking (most sensitive first):", ranking, "", "search history:", history])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"AutoCalibrationResult(status={self.status!r}, fallback_layers={list(self.fallback_layers)!r}, "
                f"fp_metric={self.fp_metric!r}, final_metric={self.final_metric!r})")

    def ranking_dict(self) -> dict[str, Any]:
        """The ranking as JSON-ready data (what ``write`` puts in the ranking file)."""
        return {"sensitivity": self.settings.sensitivity, "order": "most sensitive first",
                "layers": [{"rank": r.rank, "layer": r.name, "type": r.layer_type, "score": _jsonable(r.score)}
                           for r in self.ranking]}

    def history_dict(self) -> dict[str, Any]:
        """The outcome and every trial as JSON-ready data (what ``write`` puts in the history file)."""
        return {"status": self.status, "success": self.success, "message": self.message,
                "settings": self.settings.to_dict(), "fp32_metric": _jsonable(self.fp_metric),
                "all_quantized_metric": _jsonable(self.quant_metric),
                "final_metric": _jsonable(self.final_metric) if self.success else None,
                "layers": list(self.layers), "fallback_layers": list(self.fallback_layers),
                "seconds": round(self.seconds, 3),
                "trials": [{"index": t.index, "fallback_layers": list(t.fallback_layers), "metric": _jsonable(t.metric),
                            "ok": t.ok, "loss": _jsonable(t.loss), "seconds": round(t.seconds, 3)}
                           for t in self.history]}

    def to_dict(self) -> dict[str, Any]:
        """Everything but the model, JSON-ready."""
        out = self.history_dict()
        out["ranking"] = self.ranking_dict()["layers"]
        out["targeting"] = self.targeting.to_dict() if self.targeting is not None else None
        out["layer_configs"] = {n: None if c is None else c.to_dict() for n, c in self.layer_configs.items()}
        return out

    def amct_config(self) -> dict[str, Any]:
        """The final config as AMCT's PTQ JSON object (``quant_enable: false`` for float layers).

        Raises :class:`ConfigError` when there is no model, or a layer's config has no AMCT spelling
        (per-group weights, per-token activations).
        """
        if not self.success:
            raise ConfigError("AutoCalibrationResult.amct_config", self.status,
                              "a result with a quantized model (status 'quantized' or 'fallback')")
        return quant_json_dict(self.amct_settings, self.layer_configs)

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write the ranking, the history and (with a model) the final config into ``directory``.

        Files (each written atomically): ``auto_calibration_ranking.json``, ``auto_calibration_history.json``
        and, when there is a model, ``auto_calibration_final_targeting.yaml`` (``Targeting.from_yaml(text,
        QuantConfig)`` reads it back) and ``auto_calibration_final_config.json`` (AMCT's PTQ JSON, for
        ``quantize_model``; left out when a layer's config has no AMCT spelling). Returns what was written.
        """
        folder = Path(directory)
        written: dict[str, Path] = {}

        def put(key: str, text: str) -> None:
            path = folder / FILE_NAMES[key]
            atomic_write_text(path, text)
            written[key] = path

        put("ranking", json.dumps(self.ranking_dict(), indent=2) + "\n")
        put("history", json.dumps(self.history_dict(), indent=2) + "\n")
        if self.success and self.targeting is not None:
            put("final_targeting", self.targeting.to_yaml())
            try:
                amct = self.amct_config()
            except ConfigError:
                amct = None  # e.g. per-group weights: the Targeting YAML is the config
            if amct is not None:
                put("final_config", json.dumps(amct, indent=4) + "\n")
        return written


# -- formatting helpers -----------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
    """A metric (number, tensor, numpy value, list, dict, anything) as JSON data."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor) or (hasattr(value, "tolist") and not isinstance(value, numbers.Number)):
        return _jsonable(value.tolist())
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return repr(value)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return f"{float(value):.4g}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return f"{value.item():.4g}"
    return repr(value)


def _fmt_score(score: float, kind: str) -> str:
    return f"{score:.6f}" if kind == "cosine" else f"{score:.2f}"


def _fmt_layers(names: tuple[str, ...]) -> str:
    if not names:
        return "(none: all quantized)"
    shown = ", ".join(names[:3])
    return f"{len(names)}: {shown}{', ...' if len(names) > 3 else ''}"


# -- the criterion ------------------------------------------------------------------------------------------
Judge = Callable[[Any, Any], "tuple[bool, Any]"]


def _as_number(value: Any, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{what} is {value!r}: with max_drop the metric must be a number (higher is better); "
                        "for other metrics give metric_ok=callable(fp32_metric, metric) -> bool") from None


def _judge(metric_ok: Callable[[Any, Any], Any] | None, max_drop: float) -> Judge:
    """``(fp, new) -> (ok, loss)`` from a user function (bool, or AMCT's ``(bool, loss)``) or from ``max_drop``."""
    if metric_ok is None:
        def by_drop(fp: Any, new: Any) -> tuple[bool, Any]:
            loss = _as_number(fp, "the fp32 metric") - _as_number(new, "the metric")
            return loss <= max_drop, loss
        return by_drop
    if not callable(metric_ok):
        raise TypeError(f"metric_ok: got {metric_ok!r}; allowed: a function (fp32_metric, metric) -> bool or "
                        "(bool, loss), or a number (the largest allowed drop)")

    def by_function(fp: Any, new: Any) -> tuple[bool, Any]:
        out = metric_ok(fp, new)
        if isinstance(out, (tuple, list)):
            if len(out) != 2:
                raise TypeError(f"metric_ok returned {out!r}; allowed: a bool or a pair (bool, loss)")
            return bool(out[0]), out[1]
        return bool(out), None
    return by_function


# -- calibration data ----------------------------------------------------------------------------------------
class _Feed(abc.ABC):
    """Runs calibration batches: ``calibrate`` fills a prepared model's quantizers, ``probe`` runs the
    sensitivity batches through the float model."""

    @abc.abstractmethod
    def calibrate(self, model: nn.Module) -> None: ...

    @abc.abstractmethod
    def probe(self, model: nn.Module, limit: int) -> int: ...


class _DataFeed(_Feed):
    def __init__(self, data: Any):
        self.data = data

    def calibrate(self, model: nn.Module) -> None:
        calibrate(model, self.data, progress=False)

    def probe(self, model: nn.Module, limit: int) -> int:
        seen = 0
        for args, kwargs in _batches(self.data):
            if seen >= limit:
                break
            model(*args, **kwargs)
            seen += 1
        return seen


class _FunctionFeed(_Feed):
    """A user function that runs the batches itself (AMCT's ``evaluator.calibration(model)``)."""

    def __init__(self, run: Callable[[nn.Module], Any], name: str):
        self.run, self.name = run, name

    def _count(self, model: nn.Module) -> int:
        calls = [0]
        handle = model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        try:
            self.run(model)
        finally:
            handle.remove()
        return calls[0]

    def calibrate(self, model: nn.Module) -> None:
        need = max([q.batch_num for q in activation_quantizers(model).values()] + [1])
        # AdaRound layers learn their rounding from the inputs they saw, as ``calibrate`` does
        ada = {n: m for n, m in quant_layers(model).items() if isinstance(weight_quantizer(m), AdaRoundWeightQuantizer)
               and not bool(weight_quantizer(m).optimized)}
        cached: dict[str, list[torch.Tensor]] = {n: [] for n in ada}
        hooks = [m.register_forward_pre_hook(lambda mod, args, n=n: cached[n].append(args[0].detach()))
                 for n, m in ada.items()]
        try:
            seen = self._count(model)
        finally:
            for h in hooks:
                h.remove()
        if seen == 0:
            raise CalibrationError(f"{self.name} ran no batch through the model it was given: it must run at least "
                                   f"batch_num ({need}) forward passes of calibration data through that model")
        for name, layer in ada.items():
            if all(q.is_calibrated for q in activation_quantizers(model).values()):
                _adaround(layer, cached[name])
        try:
            check_calibrated(model)
        except CalibrationError as err:
            raise CalibrationError(f"{self.name} ran {seen} batch(es), fewer than the config's batch_num ({need}) "
                                   f"needs: {err}") from None

    def probe(self, model: nn.Module, limit: int) -> int:
        seen = self._count(model)
        if seen == 0:
            raise CalibrationError(f"{self.name} ran no batch through the model it was given (the float model "
                                   "whose layer inputs rank the layers)")
        return seen


def _feed(calibration_data: Any, name: str = "calibration_data") -> _Feed:
    """Batches, or a function that runs them through the model it is given (named in errors by its qualname)."""
    if isinstance(calibration_data, nn.Module):
        raise TypeError(f"{name}: got a {type(calibration_data).__name__} module; allowed: batches (a DataLoader, a "
                        "list of tensors) or a function that runs calibration batches through the model it is given")
    if callable(calibration_data):
        return _FunctionFeed(calibration_data, f"{getattr(calibration_data, '__qualname__', name)}(model)")
    return _DataFeed(calibration_data)


# -- sensitivity ---------------------------------------------------------------------------------------------
def _tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _tensors(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in _tensors(item)]
    return []


class _Agreement:
    """Streaming sums over all batches: the two outputs' dot product, squared norms and squared difference."""

    def __init__(self) -> None:
        self.dot = self.fp = self.q = self.noise = 0.0
        self.batches = 0

    def add(self, fp_out: Any, q_out: Any) -> None:
        a = torch.cat([t.detach().reshape(-1).double() for t in _tensors(fp_out)])
        b = torch.cat([t.detach().reshape(-1).double() for t in _tensors(q_out)])
        d = a - b
        self.dot += float(a @ b)
        self.fp += float(a @ a)
        self.q += float(b @ b)
        self.noise += float(d @ d)
        self.batches += 1

    def cosine(self) -> float:
        """AMCT's rule: an all-zero float output is matched exactly (1); an all-zero quantized one not at all (0)."""
        if self.fp == 0.0:
            return 1.0
        if self.q == 0.0:
            return 0.0
        return max(-1.0, min(1.0, self.dot / math.sqrt(self.fp * self.q)))

    def sqnr(self) -> float:
        if self.noise == 0.0:
            return SQNR_CAP_DB
        if self.fp == 0.0:
            return -SQNR_CAP_DB
        return max(-SQNR_CAP_DB, min(SQNR_CAP_DB, 10.0 * math.log10(self.fp / self.noise)))


def _rank(reference: nn.Module, quantized: nn.Module, names: list[str], feed: _Feed, limit: int,
          metric: str) -> list[LayerSensitivity]:
    """Score every layer in ``names``: the float layer of ``reference`` against the quantized wrapper of
    ``quantized`` (same module path) on the float inputs the probe batches give it."""
    wrappers = {n: quantized.get_submodule(n) for n in names}
    sums = {n: _Agreement() for n in names}

    def hook_for(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            sums[name].add(output, wrappers[name](*args, **kwargs))
        return hook

    handles = []
    for name in names:
        try:
            target = reference.get_submodule(name)
        except AttributeError:
            raise RuntimeError(f"sensitivity: the float model has no module {name!r} (the quantized model has); "
                               "the two must come from the same model") from None
        handles.append(target.register_forward_hook(hook_for(name), with_kwargs=True))
    modes = (reference.training, quantized.training)
    reference.eval()
    quantized.eval()
    try:
        with torch.no_grad():
            feed.probe(reference, limit)
    finally:
        for h in handles:
            h.remove()
        reference.train(modes[0])
        quantized.train(modes[1])
    idle = [n for n in names if sums[n].batches == 0]
    if idle:
        raise RuntimeError(f"sensitivity: {', '.join(idle)} never ran on the calibration batches; "
                           "a layer that does not run cannot be ranked")
    scores = {n: sums[n].cosine() if metric == "cosine" else sums[n].sqnr() for n in names}
    position = {n: i for i, n in enumerate(names)}
    order = sorted(names, key=lambda n: (scores[n], position[n]))
    return [LayerSensitivity(i + 1, n, type(wrappers[n].module).__name__, scores[n]) for i, n in enumerate(order)]


def _float_reference(model: nn.Module, example_inputs: Any, settings: AutoCalibrationConfig) -> nn.Module:
    """The float model as ``quantize`` sees it before wrapping: a copy with Conv+BN folded (same paths)."""
    reference = copy.deepcopy(model).eval()
    if settings.fold_bn:
        reference, _ = fold_batch_norm(reference, example_inputs, skip=settings.skip_fusion_layers, inplace=True)
    return reference


def _probe_limit(quantized: nn.Module, settings: AutoCalibrationConfig) -> int:
    if settings.sensitivity_batches is not None:
        return settings.sensitivity_batches
    return max([q.batch_num for q in activation_quantizers(quantized).values()] + [1])


def layer_sensitivity(model: nn.Module, quantized: nn.Module, calibration_data: Any, example_inputs: Any = None, *,
                      sensitivity: str = "cosine", num_batches: int | None = None, fold_bn: bool = True,
                      skip_fusion_layers: tuple[str, ...] = ()) -> list[LayerSensitivity]:
    """Rank the quantized layers of ``quantized`` (calibrated, from ``quantize(model, ...)``), most sensitive first.

    Every layer's float inputs come from ``calibration_data`` run through ``model`` with Conv+BN folded as
    ``quantize`` folded it (``fold_bn``, ``skip_fusion_layers``: as given to ``quantize``); on those inputs the
    layer's quantized wrapper is compared with the float layer: ``cosine`` similarity or ``sqnr`` (dB) of the
    outputs, accumulated over ``num_batches`` batches (default: the largest ``batch_num``).
    """
    settings = AutoCalibrationConfig(sensitivity=sensitivity, sensitivity_batches=num_batches, fold_bn=fold_bn,
                                     skip_fusion_layers=tuple(skip_fusion_layers))
    check_calibrated(quantized)
    reference = _float_reference(model, example_inputs, settings)
    return _rank(reference, quantized, list(quant_layers(quantized)), _feed(calibration_data),
                 _probe_limit(quantized, settings), settings.sensitivity)


# -- the search ----------------------------------------------------------------------------------------------
def _targeting(config: QuantConfig | Targeting | None) -> Targeting:
    if config is None:
        return Targeting(QuantConfig())
    if isinstance(config, QuantConfig):
        return Targeting(config)
    if isinstance(config, Targeting):
        return config
    raise ConfigError("auto_calibrate config", config,
                      "a QuantConfig, a Targeting of QuantConfigs, or None (INT8 defaults)")


def with_fallback(base: Targeting, layers: list[str] | tuple[str, ...],
                  fallback: QuantConfig | None = None) -> Targeting:
    """``base`` with ``layers`` kept in float (added to ``skip``) or given ``fallback`` (exact-name entries)."""
    layers = tuple(layers)
    if not layers:
        return base
    if fallback is None:
        return Targeting(base.default, module_type=dict(base.module_type), module_name=dict(base.module_name),
                         skip=tuple(base.skip) + tuple(n for n in layers if n not in base.skip))
    names = dict(base.module_name)
    names.update({n: fallback for n in layers})
    return Targeting(base.default, module_type=dict(base.module_type), module_name=names, skip=base.skip)


def _settings(search: AutoCalibrationConfig | None, options: dict[str, Any]) -> AutoCalibrationConfig:
    if search is not None and not isinstance(search, AutoCalibrationConfig):
        raise ConfigError("auto_calibrate search", search, "an AutoCalibrationConfig or None")
    settings = search or AutoCalibrationConfig()
    known = set(AutoCalibrationConfig.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"auto_calibrate {unknown[0]}", options[unknown[0]],
                          "a keyword of AutoCalibrationConfig: " + ", ".join(sorted(known)))
    return settings.replace(**options) if options else settings


class _Search:
    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module], Any], feed: _Feed, example_inputs: Any,
                 base: Targeting, settings: AutoCalibrationConfig, judge: Judge, progress: bool):
        self.model, self.evaluate, self.feed, self.example_inputs = model, evaluate, feed, example_inputs
        self.base, self.settings, self.judge = base, settings, judge
        self.log: Callable[[str], None] = ((lambda s: print(f"auto_calibrate: {s}", flush=True)) if progress
                                           else (lambda s: None))
        self.history: list[SearchTrial] = []
        self.fp_metric: Any = None

    def prepare(self, fallback: tuple[str, ...]) -> nn.Module:
        """``quantize`` + calibration with ``fallback`` layers kept in float or at the fallback config."""
        targeting = with_fallback(self.base, fallback, self.settings.fallback)
        q = quantize(self.model, targeting, self.example_inputs, fold_bn=self.settings.fold_bn,
                     skip_fusion_layers=self.settings.skip_fusion_layers,
                     quantize_outputs=self.settings.quantize_outputs)
        if not quant_layers(q):
            raise ConfigError("auto_calibrate config", repr(targeting),
                              "a config that quantizes at least one layer of the model; the plan:\n" + str(q.amct_plan))
        self.feed.calibrate(q)
        return q

    def trial(self, fallback: tuple[str, ...]) -> tuple[nn.Module, SearchTrial]:
        start = time.perf_counter()
        q = self.prepare(fallback)
        metric = self.evaluate(q)
        ok, loss = self.judge(self.fp_metric, metric)
        record = SearchTrial(len(self.history), fallback, metric, ok, loss, time.perf_counter() - start)
        self.history.append(record)
        what = "all layers quantized" if not fallback else (
            f"{len(fallback)} layer(s) {'in float' if self.settings.fallback is None else 'at the fallback config'}")
        self.log(f"trial {record.index}: {what} -> metric {_fmt(metric)} ({'ok' if ok else 'not ok'}, "
                 f"{record.seconds:.1f} s)")
        return q, record

    def run(self) -> AutoCalibrationResult:
        start = time.perf_counter()
        s = self.settings
        self.fp_metric = self.evaluate(self.model)
        ok, _ = self.judge(self.fp_metric, self.fp_metric)
        if not ok:
            raise ValueError(f"the accuracy criterion rejects the float model itself: metric_ok(fp32_metric, "
                             f"fp32_metric) is false for fp32_metric={self.fp_metric!r}; check metric_ok (or max_drop)")
        self.log(f"fp32 metric {_fmt(self.fp_metric)}")
        q0, first = self.trial(())
        quantized = list(quant_layers(q0))
        candidates = [n for n, layer in quant_layers(q0).items()
                      if s.fallback is None or getattr(layer, "quant_config", None) != s.fallback]
        ranking = _rank(_float_reference(self.model, self.example_inputs, s), q0, candidates, self.feed,
                        _probe_limit(q0, s), s.sensitivity)
        order = [r.name for r in ranking]
        n = len(order)

        final: tuple[nn.Module, SearchTrial] | None = None
        k = 0
        if first.ok:
            final = (q0, first)
        elif n:
            del q0
            k, final = self.search(order)
        chosen = tuple(order[:k])
        if final is None and n and s.fallback is not None:  # every layer at the higher precision: try it
            q, record = self.trial(chosen)
            final = (q, record) if record.ok else None
        status, message = self.outcome(final, chosen, n)
        configs: dict[str, QuantConfig | None] = {}
        model = final[0] if final is not None else None
        if model is not None:
            final_layers = quant_layers(model)
            for name in quantized:
                configs[name] = getattr(final_layers[name], "quant_config", None) if name in final_layers else None
        self.log(message)
        return AutoCalibrationResult(
            model=model, status=status, fallback_layers=chosen if model is not None else (),
            layers=tuple(candidates), ranking=ranking, history=self.history, fp_metric=self.fp_metric,
            quant_metric=first.metric,
            final_metric=final[1].metric if final is not None else None,
            targeting=with_fallback(self.base, chosen, s.fallback) if model is not None else None,
            layer_configs=configs, settings=s, seconds=time.perf_counter() - start, message=message,
            amct_settings=self.amct_settings(configs))

    def search(self, order: list[str]) -> tuple[int, tuple[nn.Module, SearchTrial] | None]:
        """The fewest worst-ranked layers to fall back, and the accepted trial (``None`` when only all of them do)."""
        n = len(order)
        best: tuple[nn.Module, SearchTrial] | None = None
        if self.settings.strategy == "greedy":
            for k in range(1, n):
                q, record = self.trial(tuple(order[:k]))
                if record.ok:
                    return k, (q, record)
            return n, None
        lo, hi = 1, n  # invariant: the answer is in [lo, hi]; all n fallen back is assumed to do
        while lo < hi:
            mid = (lo + hi) // 2
            q, record = self.trial(tuple(order[:mid]))
            if record.ok:
                hi, best = mid, (q, record)
            else:
                lo = mid + 1
            del q
        return lo, best if lo < n else None

    def outcome(self, final: tuple[nn.Module, SearchTrial] | None, chosen: tuple[str, ...],
                n: int) -> tuple[Status, str]:
        fb = self.settings.fallback
        if final is not None and not chosen:
            return "quantized", "every layer quantized: the criterion holds without fallback"
        if final is not None:
            where = "in float" if fb is None else f"at {fb.short()}"
            return "fallback", f"{len(chosen)} of {n} layers kept {where}: {', '.join(chosen)}"
        if n == 0:
            return "no_model", "the fully quantized model misses the criterion and no layer can fall back: no model"
        if fb is None:
            return "no_model", (f"no quantized model meets the criterion short of keeping all {n} layers in float: "
                                "no model (AMCT produces none either); relax the criterion or the quantization config")
        return "failed", (f"the criterion fails even with all {n} layers at {fb.short()}: no model; relax the "
                          "criterion or choose a more precise fallback (or None: float)")

    def amct_settings(self, configs: dict[str, QuantConfig | None]) -> AmctGlobal:
        batch = max([c.batch_num for c in configs.values() if c is not None] + [1])
        offsets = [c.activation_offset for c in configs.values() if c is not None and c.activation_bits is not None]
        return AmctGlobal(batch_num=batch, activation_offset=all(offsets) if offsets else True,
                          do_fusion=self.settings.fold_bn, skip_fusion_layers=tuple(self.settings.skip_fusion_layers))


def auto_calibrate(model: nn.Module, evaluate: Callable[[nn.Module], Any], calibration_data: Any,
                   example_inputs: Any, *, config: QuantConfig | Targeting | None = None,
                   search: AutoCalibrationConfig | None = None,
                   metric_ok: Callable[[Any, Any], Any] | float | None = None, progress: bool = True,
                   **options: Any) -> AutoCalibrationResult:
    """Quantize ``model``, keeping the fewest most-sensitive layers in float so that the metric holds.

    Args:
        model: the trained float model (not modified).
        evaluate: ``evaluate(model) -> metric``: runs a model (float or quantized) on the evaluation data.
        calibration_data: calibration batches (a DataLoader, a list of tensors; ``(x, y)`` uses ``x``), or a
            function ``run(model)`` that runs them through the model it is given (AMCT's evaluator
            ``calibration``). Also feeds the sensitivity ranking.
        example_inputs: inputs for graph capture (as for :func:`amct_torch.quantize`).
        config: the quantization to apply: one :class:`QuantConfig`, a :class:`Targeting` (per type / per
            name / skips), or ``None`` (INT8 defaults).
        search: the search settings (:class:`AutoCalibrationConfig`); ``options`` override its fields by
            keyword, e.g. ``max_drop=0.003, sensitivity="sqnr", strategy="greedy", fallback=QuantConfig()``.
        metric_ok: the criterion ``metric_ok(fp32_metric, metric)`` returning a bool, or ``(bool, loss)``
            like AMCT's ``metric_eval``; a number is ``max_drop``; ``None`` uses ``search.max_drop``
            (``fp32_metric - metric <= max_drop``, higher metrics better).
        progress: print one line per evaluated model.

    Returns:
        an :class:`AutoCalibrationResult`: the final calibrated model (``None`` when no quantized model meets
        the criterion: check ``result.success`` / ``result.status``), the fallback layers, the ranking, the
        history and the final config (``result.targeting``; ``result.write(dir)`` writes the files).

    Raises:
        ValueError: the criterion rejects the float model's own metric.
        CalibrationError: the calibration data ran out before every quantizer had its ``batch_num`` batches.
    """
    if isinstance(metric_ok, numbers.Real) and not isinstance(metric_ok, bool):
        options = {**options, "max_drop": float(metric_ok)}
        metric_ok = None
    settings = _settings(search, options)
    if not callable(evaluate):
        raise TypeError(f"evaluate: got {evaluate!r}; allowed: a function evaluate(model) -> metric")
    return _Search(model, evaluate, _feed(calibration_data), example_inputs, _targeting(config), settings,
                   _judge(metric_ok, settings.max_drop), progress).run()
