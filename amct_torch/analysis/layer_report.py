"""Per-layer report of any prepared model: bits, scales and clip ranges, sparsity, unique values, MACs, and the
error of each layer's output against the float model; as a table, JSON, Markdown or HTML with PNG plots.

    report = layer_report(model, data=calib_loader, num_batches=4)   # quantized, pruned, clustered, QAT, float...
    print(report.table())
    report.write_markdown("out/report.md")        # out/report.md + out/report_plots/*.png
    report.write_html("out/report.html")          # one self-contained file, PNGs embedded
    report.write_json("out/report.json")          # LayerReport.read_json(...) reads it back, plots included
    report.plot("error"); report.plot("histogram", layer="layer1.0.conv1")

One row per :class:`~amct_torch.nn.CompressedLayer` (with or without a weight) and per float Conv / ConvTranspose /
Linear (transformers' ``Conv1D``) outside the wrappers, in module order. A plain float model gives one row per
layer with 32 bits (the weight's dtype; a layer without an input quantizer computes in that dtype).

Read from the model, without data:

* weight: bits, the quantizer's algorithm and granularity, its scale and offset (the value per tensor, or
  min / max / mean over channels or groups), learned weight clips (ULQ) or scales (LSQ); the activation
  quantizers (input and output slot): bits, calibrator or learned algorithm, scale, offset and the clip range
  they represent, ``[(qmin - offset) * scale, (qmax - offset) * scale]``, and the learned parameters
  (ULQ ``clip_min`` / ``clip_max``, LSQ+ ``scale`` / ``beta``);
* ``sparsity``: the fraction of exact zeros in the weight the op sees (``effective_weight()``);
  ``mask_sparsity``: the fraction the mask stage removes (pruning, N:M); unique values in the tensor and the
  most in one output channel, counted as :func:`~amct_torch.analysis.compression_report` counts them (on the
  integer weight when the layer is quantized);
* params and MACs from :func:`~amct_torch.analysis.flops.count_flops` over ``example_inputs`` (default: the
  first batch of ``data``; without either, MACs are ``None``).

With ``data`` (``num_batches`` batches run through the model and through ``reference``):

* ``sqnr_db`` / ``cosine``: the layer alone. Each layer of the compressed model gets the *float* inputs its
  counterpart receives in the reference, and its output is compared with the reference layer's output:
  ``SQNR = 10 log10(sum ref^2 / sum (ref - out)^2)`` over all batches and AMCT's cosine similarity (the code
  :func:`~amct_torch.quant.auto_calibration.layer_sensitivity` ranks with). A layer that computes exactly
  what the reference does scores the cap, ``SQNR_CAP_DB`` (300 dB);
* ``model_sqnr_db`` / ``model_cosine``: the layer's output inside the compressed model (the errors of the
  layers before it included) against the same layer's output in the reference;
* the histogram of what the layer's input quantizer receives, and ``activation_clipped``: the fraction of
  those values outside the quantizer's range (they saturate).

The reference is ``reference`` (the float model before compression) when given, else the model with its
compression removed the way :func:`~amct_torch.analysis.compression_report` derives its fp32 baseline
(wrappers unwrapped to their original layers and weights, activation quantizers removed, QAT's folded
BatchNorms restored). BatchNorms the model folded into convolutions (``quantize``) are folded in a copy of a
given reference the same way; a conv trained with its BatchNorm folded (QAT) is compared with the reference
BatchNorm's output. Layers a decomposition replaced by factors are compared as a chain: the factors together
against the reference layer, on the chain's last factor's row (pass the original model as ``reference``:
the derived one already holds the factors).

The model is never changed: everything runs on deep copies.
"""

from __future__ import annotations

import base64
import copy
import html
import io
import itertools
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from ..config.amct_proto import atomic_write_text
from ..export.files import write_all
from ..graph import fold_batch_norm
from ..graph.capture import normalize_inputs
from ..graph.plan import render_table
from ..nn import CompressedConv, CompressedLayer
from ..quant.auto_calibration import SQNR_CAP_DB, _Agreement, _tensors
from ..quant.dynamic import DynamicActivationQuantizer
from ..quant.formulas import channel_major, qrange
from ..quant.ptq import CalibrationError, _batches, check_calibrated, quant_layers, weight_quantizer
from ..quant.qat_modules import LearnedActivationQuantizer, LsqActivationQuantizer, UlqActivationQuantizer
from ..quant.quantizers import ActivationQuantizer
from ..quant.weight_only import GroupWeightQuantizer
from ..sparsity.masks import mask_stage
from .flops import _params, count_flops, layers_outside_wrappers
from .report import _counted_weight, _weight_counts, plain_copy

__all__ = ["layer_report", "LayerReport", "LayerRow", "QuantizerInfo", "Stats", "Histogram", "PLOT_KINDS",
           "SQNR_CAP_DB"]

#: what :meth:`LayerReport.plot` draws
PLOT_KINDS = ("error", "sparsity", "histogram")

_BINS = 80
_GRID_MAX_LEVELS = 64          # quantization grids with more levels are marked by their clip range only
_SAMPLES_PER_CALL = 16384      # activation values kept per call of a layer (evenly strided)
_SAMPLES_MAX = 65536           # and per layer over all batches


# -- rows --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stats:
    """A tensor of factors summarised: ``count`` values (1: per tensor), their min, max and mean."""

    count: int
    min: float
    max: float
    mean: float

    @classmethod
    def of(cls, t: torch.Tensor) -> "Stats":
        t = t.detach().double().reshape(-1)
        return cls(int(t.numel()), float(t.min()), float(t.max()), float(t.mean()))

    @property
    def value(self) -> float | None:
        """The one value of a per-tensor factor (``None`` when there are several)."""
        return self.min if self.count == 1 else None

    def short(self) -> str:
        if self.count == 1 or self.min == self.max:
            return f"{self.min:.4g}"
        return f"{self.min:.3g}..{self.max:.3g}"


@dataclass(frozen=True)
class QuantizerInfo:
    """An activation quantizer (a layer's input or output slot).

    Attributes:
        algorithm: the calibrator (``minmax``, ``ifmr``, ``hfmg``, ...), ``ulq`` / ``lsq_plus`` (learned),
            or ``dynamic`` (factors from each input; no fixed scale).
        calibrated: the factors are set (after ``batch_num`` calibration batches, or QAT initialisation).
        scale, offset: the factors (``None`` until calibrated, and for dynamic quantizers).
        clip_min, clip_max: the range the factors represent, ``(qmin - offset) * scale`` to
            ``(qmax - offset) * scale``.
        learned: the learned parameters: ULQ ``clip_max`` (and ``clip_min`` when it is learned), LSQ+ ``scale``
            (and ``beta``).
        tied_to: the quantizer whose factors this one reuses (module path), if any.
    """

    bits: int | None
    algorithm: str
    symmetric: bool | None
    calibrated: bool
    scale: float | None = None
    offset: int | None = None
    clip_min: float | None = None
    clip_max: float | None = None
    learned: dict[str, float] = field(default_factory=dict)
    tied_to: str | None = None

    def short(self) -> str:
        if self.algorithm.startswith("dynamic"):
            return self.algorithm
        if not self.calibrated:
            return "not calibrated"
        return f"[{self.clip_min:.4g}, {self.clip_max:.4g}]"


@dataclass(frozen=True)
class Histogram:
    """A histogram to plot: ``counts[i]`` values in ``[edges[i], edges[i+1])``.

    ``unit`` names the x axis; ``grid`` holds the quantization levels (or a clustered weight's shared values)
    when there are few enough to draw; ``marks`` are labelled vertical lines (clip range); ``note`` says what
    was left out.
    """

    edges: tuple[float, ...]
    counts: tuple[int, ...]
    unit: str
    grid: tuple[float, ...] = ()
    grid_label: str = ""
    marks: dict[str, float] = field(default_factory=dict)
    note: str = ""

    @classmethod
    def of(cls, values: torch.Tensor, unit: str, *, grid: Iterable[float] = (), grid_label: str = "",
           marks: dict[str, float] | None = None, note: str = "") -> "Histogram":
        values = values.detach().reshape(-1).cpu().double()
        values = values[torch.isfinite(values)]
        marks = {k: float(v) for k, v in (marks or {}).items() if v is not None and math.isfinite(v)}
        grid = tuple(float(g) for g in grid)
        ends = [float(values.min()), float(values.max())] if values.numel() else [0.0, 1.0]
        lo, hi = min(ends + list(marks.values())), max(ends + list(marks.values()))
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts = torch.histc(values, bins=_BINS, min=lo, max=hi) if values.numel() else torch.zeros(_BINS)
        edges = torch.linspace(lo, hi, _BINS + 1, dtype=torch.float64)
        return cls(tuple(float(e) for e in edges), tuple(int(c) for c in counts), unit, grid, grid_label, marks, note)


@dataclass(frozen=True)
class LayerRow:
    """One layer's line of a :class:`LayerReport` (see the module docstring for how each figure is made).

    ``None`` means "does not apply" (a weightless layer has no weight figures; without data there is no
    error; a layer that did not run has no MACs).
    """

    name: str
    layer_type: str                       # the wrapped (or float) module's class
    wrapper: str | None                   # the CompressedLayer class, None for a float layer
    stages: tuple[str, ...]               # the weight pipeline, in order
    weight_bits: int | None
    activation_bits: int | None
    weight_algorithm: str | None = None
    weight_granularity: str | None = None
    weight_scale: Stats | None = None
    weight_offset: Stats | None = None
    weight_learned: dict[str, Stats] = field(default_factory=dict)
    activation: QuantizerInfo | None = None   # the input quantizer
    output: QuantizerInfo | None = None       # the output quantizer
    weights: int = 0
    sparsity: float | None = None
    mask_sparsity: float | None = None
    unique_values: int | None = None
    max_unique_per_channel: int | None = None
    params: int = 0
    macs: int | None = None
    effective_macs: int | None = None
    sqnr_db: float | None = None
    cosine: float | None = None
    model_sqnr_db: float | None = None
    model_cosine: float | None = None
    compared_with: str | None = None
    activation_clipped: float | None = None
    weight_histogram: Histogram | None = field(default=None, repr=False)
    activation_histogram: Histogram | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["stages"] = list(self.stages)
        for key in ("weight_histogram", "activation_histogram"):
            if d[key] is not None:
                d[key]["edges"], d[key]["counts"], d[key]["grid"] = (list(d[key]["edges"]), list(d[key]["counts"]),
                                                                      list(d[key]["grid"]))
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LayerRow":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"LayerRow.from_dict: unknown key(s) {unknown}; allowed: {sorted(known)}")
        d = dict(d)
        d["stages"] = tuple(d.get("stages", ()))
        for key in ("weight_scale", "weight_offset"):
            if d.get(key) is not None:
                d[key] = Stats(**d[key])
        d["weight_learned"] = {k: Stats(**v) for k, v in (d.get("weight_learned") or {}).items()}
        for key in ("activation", "output"):
            if d.get(key) is not None:
                d[key] = QuantizerInfo(**d[key])
        for key in ("weight_histogram", "activation_histogram"):
            h = d.get(key)
            if h is not None:
                d[key] = Histogram(**{**h, "edges": tuple(h["edges"]), "counts": tuple(h["counts"]),
                                      "grid": tuple(h["grid"])})
        return cls(**d)


# -- the report --------------------------------------------------------------------------------------------
def _fmt_int(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "exact" if v >= SQNR_CAP_DB else f"{v:.1f}"


def _fmt_cos(v: float | None) -> str:
    return "-" if v is None else f"{v:.6f}"


def _fmt_pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _bits(row: LayerRow) -> str:
    w = "-" if row.weight_bits is None else str(row.weight_bits)
    a = "-" if row.activation_bits is None else str(row.activation_bits)
    return f"W{w}/A{a}"


_LEGEND = ("bits: W<weight>/A<activation>; w scale: per tensor, or min..max over channels; act range: the input "
           "quantizer's clip range; unique: distinct (integer, when quantized) weight values; SQNR dB / cosine: the "
           "layer alone on the reference's float inputs; SQNR dB (model): inside the compressed model; exact: no "
           f"error (capped at {SQNR_CAP_DB:g} dB)")

_COLUMNS = ["layer", "type", "bits", "w scale", "act range", "sparsity", "unique", "max uniq/ch", "params", "MACs",
            "SQNR dB", "cosine", "SQNR dB (model)"]


def _cells(row: LayerRow) -> list[str]:
    return [row.name or "(model)", row.layer_type, _bits(row),
            row.weight_scale.short() if row.weight_scale is not None else "-",
            row.activation.short() if row.activation is not None else "-",
            _fmt_pct(row.sparsity), _fmt_int(row.unique_values), _fmt_int(row.max_unique_per_channel),
            _fmt_int(row.params), _fmt_int(row.macs), _fmt_db(row.sqnr_db), _fmt_cos(row.cosine),
            _fmt_db(row.model_sqnr_db)]


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


@dataclass
class LayerReport:
    """Rows in module order, totals, notes and the settings the report was made with.

    ``report["layer1.0.conv1"]`` is one row; ``print(report)`` the table. ``to_dict`` / ``from_dict`` and
    ``write_json`` / ``read_json`` round-trip everything, histograms included, so a report read back plots.
    """

    rows: list[LayerRow] = field(default_factory=list)
    total_params: int | None = None
    total_macs: int | None = None
    notes: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    # -- access ------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no layer {name!r} in the report; layers: {', '.join(r.name for r in self.rows)}")

    @property
    def has_errors(self) -> bool:
        """True when the report was made with data (the rows have SQNR / cosine)."""
        return any(r.sqnr_db is not None or r.model_sqnr_db is not None for r in self.rows)

    # -- text --------------------------------------------------------------------------------------------
    def _summary(self) -> list[str]:
        out = [f"{len(self.rows)} layers"]
        if self.total_params is not None:
            out.append(f"params {self.total_params:,}")
        if self.total_macs is not None:
            out.append(f"MACs {self.total_macs:,}")
        if self.settings.get("batches"):
            out.append(f"error over {self.settings['batches']} batch(es) against {self.settings.get('reference')}")
        return ["; ".join(out)]

    def table(self) -> str:
        """The summary, one line per layer, and the notes, as fixed-width text."""
        body = render_table(_COLUMNS, [_cells(r) for r in self.rows])
        return "\n".join(self._summary() + [body, _LEGEND] + [f"note: {n}" for n in self.notes])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"LayerReport(layers={len(self.rows)}, total_params={self.total_params}, total_macs={self.total_macs}, "
                f"with_errors={self.has_errors})")

    # -- data --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: rows (histograms included), totals, notes and settings."""
        return {"rows": [r.to_dict() for r in self.rows], "total_params": self.total_params,
                "total_macs": self.total_macs, "notes": list(self.notes), "settings": dict(self.settings),
                "sqnr_cap_db": SQNR_CAP_DB}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LayerReport":
        """The report :meth:`to_dict` gave."""
        if not isinstance(data, dict) or "rows" not in data:
            raise ValueError("LayerReport.from_dict: expected the dict LayerReport.to_dict() returns (with 'rows')")
        return cls([LayerRow.from_dict(r) for r in data["rows"]], data.get("total_params"), data.get("total_macs"),
                   list(data.get("notes", [])), dict(data.get("settings", {})))

    def write_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON (atomically); returns the path."""
        path = Path(path)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def read_json(cls, path: str | os.PathLike) -> "LayerReport":
        """A report :meth:`write_json` wrote."""
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    # -- plots -------------------------------------------------------------------------------------------
    def plot(self, kind: str, layer: str | None = None):
        """A matplotlib ``Figure`` (no pyplot state is touched; safe in notebooks and scripts alike).

        Args:
            kind: ``error`` (per-layer SQNR bars: the layer alone and inside the model; needs data),
                ``sparsity`` (per-layer zero fraction, and the part the masks made), or ``histogram``
                (``layer``'s weight histogram with the quantization grid and clip range, and its input
                activation histogram with the quantizer's range when the report was made with data).
            layer: the layer for ``histogram``.
        """
        if kind not in PLOT_KINDS:
            raise ValueError(f"LayerReport.plot: unknown kind {kind!r}; allowed: {', '.join(PLOT_KINDS)}")
        if kind == "histogram":
            if layer is None:
                raise ValueError("LayerReport.plot('histogram') needs layer=<a layer name>; layers: "
                                 + ", ".join(r.name for r in self.rows))
            return _plot_histograms(self[layer])
        if layer is not None:
            raise ValueError(f"LayerReport.plot({kind!r}) draws every layer; layer= is only for 'histogram'")
        return _plot_error(self.rows) if kind == "error" else _plot_sparsity(self.rows)

    def _figures(self, histograms: Iterable[str] | None) -> list[tuple[str, str, bytes]]:
        """``(title, file name, PNG bytes)`` of every figure the documents hold."""
        out: list[tuple[str, str, bytes]] = []
        if self.has_errors:
            out.append(("Output error per layer", "error.png", _png(self.plot("error"))))
        if any(r.sparsity is not None for r in self.rows):
            out.append(("Sparsity per layer", "sparsity.png", _png(self.plot("sparsity"))))
        names = [r.name for r in self.rows] if histograms is None else list(histograms)
        used: set[str] = set()
        for name in names:
            row = self[name]
            if row.weight_histogram is None and row.activation_histogram is None:
                continue
            stem = base = "histogram_" + _safe_name(name)
            for i in itertools.count(2):
                if stem not in used:
                    break
                stem = f"{base}_{i}"
            used.add(stem)
            out.append((f"Histograms: {name}", stem + ".png", _png(_plot_histograms(row))))
        return out

    def markdown(self, figures: list[tuple[str, str]] = ()) -> str:
        """The Markdown text: summary, table, notes, and ``![title](path)`` for each ``(title, path)``."""
        def esc(s: str) -> str:
            return s.replace("|", "\\|")
        lines = ["# Layer report", "", *self._summary(), "",
                 "| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
        lines += ["| " + " | ".join(esc(c) for c in _cells(r)) + " |" for r in self.rows]
        lines += ["", esc(_LEGEND)]
        if self.notes:
            lines += ["", "Notes:", ""] + [f"* {esc(n)}" for n in self.notes]
        for title, path in figures:
            lines += ["", f"## {title}", "", f"![{title}]({path})"]
        return "\n".join(lines) + "\n"

    def write_markdown(self, path: str | os.PathLike, plots: bool = True, *,
                       histograms: Iterable[str] | None = None) -> Path:
        """Write a Markdown file with the table and, with ``plots``, PNGs in ``<stem>_plots/`` next to it.

        ``histograms``: the layers that get a histogram figure (default: every layer with histogram data).
        All files are written together or not at all (temp files, then renamed). Returns the Markdown path.
        """
        path = Path(path)
        figures = self._figures(histograms) if plots else []
        folder = path.parent / f"{path.stem}_plots"
        writers: dict[Path, Callable[[Path], None]] = {}
        for _, name, data in figures:
            writers[folder / name] = lambda tmp, data=data: tmp.write_bytes(data)
        text = self.markdown([(title, f"{folder.name}/{name}") for title, name, _ in figures])
        writers[path] = lambda tmp: tmp.write_text(text, encoding="utf-8")
        write_all(writers)
        return path

    def html(self, plots: bool = True, *, histograms: Iterable[str] | None = None) -> str:
        """A self-contained HTML page: the table, the notes and the PNGs embedded as base64."""
        e = html.escape
        head = ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Layer report</title><style>"
                "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:13px}"
                "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}td:first-child,td:nth-child(2)"
                "{text-align:left}th{background:#eee}img{max-width:100%}</style></head><body>")
        parts = [head, "<h1>Layer report</h1>", *(f"<p>{e(s)}</p>" for s in self._summary()), "<table><tr>"]
        parts += [f"<th>{e(c)}</th>" for c in _COLUMNS] + ["</tr>"]
        for r in self.rows:
            parts.append("<tr>" + "".join(f"<td>{e(c)}</td>" for c in _cells(r)) + "</tr>")
        parts.append(f"</table><p><small>{e(_LEGEND)}</small></p>")
        if self.notes:
            parts.append("<ul>" + "".join(f"<li>{e(n)}</li>" for n in self.notes) + "</ul>")
        for title, _, data in (self._figures(histograms) if plots else []):
            parts.append(f"<h2>{e(title)}</h2><img alt=\"{e(title)}\" "
                         f"src=\"data:image/png;base64,{base64.b64encode(data).decode('ascii')}\">")
        parts.append("</body></html>\n")
        return "\n".join(parts)

    def write_html(self, path: str | os.PathLike, plots: bool = True, *,
                   histograms: Iterable[str] | None = None) -> Path:
        """Write :meth:`html` (atomically); returns the path."""
        path = Path(path)
        atomic_write_text(path, self.html(plots, histograms=histograms))
        return path


# -- figures -----------------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:  # pragma: no cover - matplotlib is a dependency
        raise ImportError("LayerReport plots need matplotlib (pip install matplotlib); table(), to_dict() and "
                          "write_json() work without it") from None
    return Figure(figsize=(width, height), dpi=100)


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _height(n: int) -> float:
    return 1.6 + 0.28 * max(n, 1)


def _plot_error(rows: list[LayerRow]):
    shown = [r for r in rows if r.sqnr_db is not None or r.model_sqnr_db is not None]
    if not shown:
        raise ValueError("LayerReport.plot('error'): the report has no SQNR; make it with data "
                         "(layer_report(model, data=batches)) to compare each layer with the float reference")
    finite = [v for r in shown for v in (r.sqnr_db, r.model_sqnr_db) if v is not None and v < SQNR_CAP_DB]
    top = max(finite + [1.0]) * 1.15 + 5.0  # exact layers are drawn to here, hatched, not to 300 dB
    fig = _figure(8, _height(len(shown)))
    ax = fig.subplots()
    ys = list(range(len(shown)))
    for offset, key, label, color in ((-0.2, "sqnr_db", "layer alone (float inputs)", "tab:blue"),
                                      (0.2, "model_sqnr_db", "in the compressed model", "tab:orange")):
        vals = [getattr(r, key) for r in shown]
        width = [0.0 if v is None else min(v, top) for v in vals]
        bars = ax.barh([y + offset for y in ys], width, height=0.38, color=color, label=label)
        for bar, v in zip(bars, vals):
            if v is not None and v >= SQNR_CAP_DB:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
    ax.set_yticks(ys, [r.name or "(model)" for r in shown], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlabel("SQNR (dB, higher is better; hatched: exact)")
    ax.set_title("Output SQNR against the float reference")
    _legend_below(fig, ax)
    return fig


def _legend_below(fig, ax) -> None:
    """The legend under the axes, clear of the bars."""
    fig.legend(*ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize="small", frameon=False)
    fig.tight_layout(rect=(0, 0.4 / fig.get_figheight(), 1, 1))


def _plot_sparsity(rows: list[LayerRow]):
    shown = [r for r in rows if r.sparsity is not None]
    if not shown:
        raise ValueError("LayerReport.plot('sparsity'): no layer of the report has a weight")
    fig = _figure(8, _height(len(shown)))
    ax = fig.subplots()
    ys = list(range(len(shown)))
    ax.barh(ys, [100 * r.sparsity for r in shown], height=0.6, color="tab:green", label="zeros in the effective weight")
    masked = [(y, 100 * r.mask_sparsity) for y, r in zip(ys, shown) if r.mask_sparsity is not None]
    if masked:
        ax.scatter([m for _, m in masked], [y for y, _ in masked], marker="|", s=200, color="black",
                   label="masked (pruning)", zorder=3)
    ax.set_yticks(ys, [r.name or "(model)" for r in shown], fontsize="small")
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("sparsity (%)")
    ax.set_title("Weight sparsity per layer")
    _legend_below(fig, ax)
    return fig


def _draw_histogram(ax, h: Histogram, title: str) -> None:
    ax.stairs(h.counts, h.edges, fill=True, color="tab:blue", alpha=0.75)  # one patch: fast to draw
    for i, g in enumerate(h.grid):
        ax.axvline(g, color="gray", linewidth=0.6, alpha=0.6, label=(h.grid_label or "grid") if i == 0 else None)
    colors = itertools.cycle(["tab:red", "tab:purple", "tab:orange", "tab:brown"])
    for label, value in h.marks.items():
        ax.axvline(value, color=next(colors), linewidth=1.5, linestyle="--", label=f"{label} = {value:.4g}")
    ax.set_xlabel(h.unit)
    ax.set_ylabel("count")
    ax.set_title(title + (f"\n{h.note}" if h.note else ""), fontsize="medium")
    if h.grid or h.marks:
        ax.legend(fontsize="x-small")


def _plot_histograms(row: LayerRow):
    panels = [(h, t) for h, t in ((row.weight_histogram, "weight"), (row.activation_histogram, "input activation"))
              if h is not None]
    if not panels:
        raise ValueError(f"LayerReport.plot('histogram'): layer {row.name!r} has no histogram data"
                         + (" (it has no weight; make the report with data for its activation histogram)"
                            if row.weight_histogram is None else ""))
    fig = _figure(6.5 * len(panels), 3.8)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (h, what) in zip(axes, panels):
        _draw_histogram(ax, h, f"{row.name or '(model)'}: {what}")
    fig.subplots_adjust(left=0.08 / len(panels) + 0.02, right=0.98, bottom=0.14, top=0.86, wspace=0.22)
    return fig


# -- reading the model -------------------------------------------------------------------------------------
def _is_weight_layer(m: nn.Module) -> bool:
    if not isinstance(getattr(m, "weight", None), torch.Tensor):
        return False
    return isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) or type(m).__name__ == "Conv1D"


def _layout(m: nn.Module) -> tuple[int, int]:
    """Output-channel axis and groups of a float layer's weight (as the wrappers define them)."""
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        return 1, m.groups
    if type(m).__name__ == "Conv1D":
        return 1, 1
    return 0, 1


def _report_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every wrapper and every float weight layer outside the wrappers, in module order."""
    return layers_outside_wrappers(model, lambda name, m: _is_weight_layer(m))


def _group_stage(layer: CompressedLayer) -> GroupWeightQuantizer | None:
    return next((s for s in layer.weight_pipeline or () if isinstance(s, GroupWeightQuantizer)), None)


def _levels(bits: int) -> range:
    qmin, qmax = qrange(bits)
    return range(qmin, qmax + 1)


def _weight_quant(layer: CompressedLayer, row: dict[str, Any]) -> None:
    """Weight bits, algorithm, granularity, factors, counts and histogram of a wrapper with a weight."""
    w_eff = layer.effective_weight().detach()
    row["weights"] = w_eff.numel()
    row["sparsity"] = float((w_eff == 0).sum()) / max(w_eff.numel(), 1)
    mask = mask_stage(layer)
    row["mask_sparsity"] = float((mask.mask == 0).sum()) / max(mask.mask.numel(), 1) if mask is not None else None
    keep = (mask.mask != 0) if mask is not None else None
    masked_note = ""
    if keep is not None and not bool(keep.all()):
        masked_note = f"{int((~keep).sum()):,} masked weights not shown"
    axis, groups = layer.weight_channel_axis, getattr(layer.module, "groups", 1)
    arq, group = weight_quantizer(layer), _group_stage(layer)
    if group is not None:
        w_in = layer.weight_pipeline.input_of(group, layer.module.weight).detach()
        row["weight_bits"] = group.bits
        row["weight_algorithm"] = ("gptq" if group.stores_integers else "minmax")
        row["weight_granularity"] = "per_channel" if group.group_size == -1 else f"per_group({group.group_size})"
        row["weight_scale"], row["weight_offset"] = Stats.of(group.scale), Stats.of(group.offset)
        try:
            counted = group.integer_weight(w_in)  # channel-major (out, in)
            _, _, row["unique_values"], row["max_unique_per_channel"] = _weight_counts(counted, 0)
        except CalibrationError:  # GPTQ not run yet: the stage passes the float weight
            _, _, row["unique_values"], row["max_unique_per_channel"] = _weight_counts(w_eff, axis, groups)
        rows = channel_major(w_in.double(), axis)
        scale = group.scale.double().repeat_interleave(group.block, dim=1)
        off = 0.0 if group.symmetric else group.offset.double().repeat_interleave(group.block, dim=1)
        values = rows / scale + off
        if keep is not None:
            values = values[channel_major(keep, axis)]
        qmin, qmax = qrange(group.bits)
        row["weight_histogram"] = Histogram.of(
            values, "weight / group scale + offset (grid steps)",
            grid=_levels(group.bits) if 2 ** group.bits <= _GRID_MAX_LEVELS else (), grid_label="levels",
            marks={"qmin": qmin, "qmax": qmax}, note=masked_note)
        return
    if arq is not None:
        w_in = layer.weight_pipeline.input_of(arq, layer.module.weight).detach()
        w_counted, bits = _counted_weight(layer)  # runs the stage: learned stages refresh their scale
        row["weight_bits"] = int(bits)
        row["weight_algorithm"] = getattr(arq, "algorithm", None) or (
            "adaround" if type(arq).__name__ == "AdaRoundWeightQuantizer" else "arq")
        row["weight_granularity"] = "per_channel" if arq.per_channel else "per_tensor"
        row["weight_scale"], row["weight_offset"] = Stats.of(arq.scale), Stats.of(arq.offset)
        learned = {}
        if isinstance(getattr(arq, "clip", None), torch.Tensor):
            learned["clip"] = Stats.of(arq.clip)
        if isinstance(getattr(arq, "learned_scale", None), torch.Tensor):
            learned["scale"] = Stats.of(arq.learned_scale)
        row["weight_learned"] = learned
        _, _, row["unique_values"], row["max_unique_per_channel"] = _weight_counts(w_counted, axis, groups)
        qmin, qmax = qrange(arq.bits)
        levels = _levels(arq.bits) if 2 ** arq.bits <= _GRID_MAX_LEVELS else ()
        if arq.per_channel:
            values = w_in.double() / arq.broadcast(arq.scale.double(), w_in.shape)
            if keep is not None:
                values = values[keep]
            row["weight_histogram"] = Histogram.of(values, "weight / channel scale (grid steps)", grid=levels,
                                                   grid_label="levels", marks={"qmin": qmin, "qmax": qmax},
                                                   note=masked_note)
        else:
            s = float(arq.scale.reshape(-1)[0])
            values = w_in[keep] if keep is not None else w_in
            row["weight_histogram"] = Histogram.of(values, "weight", grid=[q * s for q in levels], grid_label="levels",
                                                   marks={"clip min": qmin * s, "clip max": qmax * s},
                                                   note=masked_note)
        return
    _float_weight(w_eff, axis, groups, row, keep, masked_note)


def _float_weight(w: torch.Tensor, axis: int, groups: int, row: dict[str, Any], keep: torch.Tensor | None = None,
                  masked_note: str = "") -> None:
    """Counts and histogram of an unquantized weight (a float layer, or a pruned / clustered wrapper)."""
    w = w.detach()
    row["weights"] = w.numel()
    row.setdefault("sparsity", float((w == 0).sum()) / max(w.numel(), 1))
    row["weight_bits"] = torch.finfo(w.dtype).bits if w.is_floating_point() else torch.iinfo(w.dtype).bits
    _, _, row["unique_values"], row["max_unique_per_channel"] = _weight_counts(w, axis, groups)
    values = w[keep] if keep is not None else w
    shared = torch.unique(values) if row["unique_values"] <= _GRID_MAX_LEVELS else ()
    row["weight_histogram"] = Histogram.of(values, "weight", grid=[float(v) for v in shared],
                                           grid_label="shared values", note=masked_note)


def _module_paths(model: nn.Module) -> dict[int, str]:
    return {id(m): n for n, m in model.named_modules()}


def _quantizer_info(q: nn.Module | None, paths: dict[int, str]) -> QuantizerInfo | None:
    if q is None:
        return None
    if isinstance(q, DynamicActivationQuantizer):
        return QuantizerInfo(q.bits, "dynamic per_token" if q.per_token else "dynamic", q.symmetric, True)
    if not isinstance(q, ActivationQuantizer):
        return QuantizerInfo(getattr(q, "bits", None), type(q).__name__, getattr(q, "symmetric", None), True)
    source = q.tied_to or q
    calibrated = q.is_calibrated if q.tied_to is None else source.is_calibrated
    learned_kind = isinstance(source, LearnedActivationQuantizer)
    algorithm = getattr(source, "algorithm", None) if learned_kind else source.calibrator.name
    tied = paths.get(id(q.tied_to)) if q.tied_to is not None else None
    if not calibrated:
        return QuantizerInfo(source.bits, algorithm, source.symmetric, False, tied_to=tied)
    if isinstance(source, LearnedActivationQuantizer):
        s, o = source.current_factors()
        scale, offset = float(s), int(o)
    else:
        scale, offset = float(source.scale), int(source.offset)
    learned: dict[str, float] = {}
    if isinstance(source, UlqActivationQuantizer):
        learned["clip_max"] = float(source.clip_max)
        if source._min() is not None:
            learned["clip_min"] = float(source.clip_min)
    elif isinstance(source, LsqActivationQuantizer):
        learned["scale"] = float(source.learned_scale)
        if source._beta() is not None:
            learned["beta"] = float(source.learned_beta)
    qmin, qmax = qrange(source.bits)
    return QuantizerInfo(source.bits, algorithm, source.symmetric, True, scale, offset, (qmin - offset) * scale,
                         (qmax - offset) * scale, learned, tied)


def _static_row(name: str, m: nn.Module, paths: dict[int, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"name": name}
    if isinstance(m, CompressedLayer):
        inner = m.module
        row.update(layer_type=type(inner).__name__, wrapper=type(m).__name__,
                   stages=tuple(type(s).__name__ for s in m.weight_pipeline or ()))
        row["activation"] = _quantizer_info(m.input_quantizer, paths)
        row["output"] = _quantizer_info(m.output_quantizer, paths)
        if m.has_weight and m.weight_pipeline is not None:
            _weight_quant(m, row)
            dtype = m.module.weight.dtype
        else:
            row["weight_bits"] = None
            dtype = None
    else:
        inner = m
        row.update(layer_type=type(m).__name__, wrapper=None, stages=())
        axis, groups = _layout(m)
        _float_weight(m.weight, axis, groups, row)
        dtype = m.weight.dtype
    act = row.get("activation")
    if act is not None:
        row["activation_bits"] = act.bits
    else:
        row["activation_bits"] = None if dtype is None else (torch.finfo(dtype).bits if dtype.is_floating_point
                                                             else torch.iinfo(dtype).bits)
    row["params"] = _params(inner)
    return row


# -- data --------------------------------------------------------------------------------------------------
def _inputs_of(batch: Any, input_fn: Callable[[Any], Any] | None) -> tuple[tuple, dict]:
    if input_fn is None:
        return next(iter(_batches([batch])))
    out = input_fn(batch)
    if out is None:
        raise TypeError("input_fn returned None; it must return the model's inputs for one batch: a tensor, a "
                        "tuple of positional inputs, or a dict of keyword inputs")
    return normalize_inputs(out)


def _collect_batches(data: Any, num_batches: int, input_fn: Callable[[Any], Any] | None) -> list[tuple[tuple, dict]]:
    if isinstance(data, torch.Tensor):
        data = [data]
    try:
        iterator = iter(data)
    except TypeError:
        raise TypeError(f"layer_report data: got {type(data).__name__}; allowed: batches (a DataLoader, a list of "
                        "tensors, (x, y) tuples, dicts of keyword inputs), one tensor, or a function that runs "
                        "batches through the model it is given") from None
    batches = [_inputs_of(b, input_fn) for b in itertools.islice(iterator, num_batches)]
    if not batches:
        raise ValueError("layer_report data: it gave no batch; pass at least one batch of model inputs")
    return batches


@dataclass
class _Unit:
    """One comparison: the model's module at ``model_path`` on the reference inputs of ``in_path``, against
    the reference output of ``out_path``; the figures go to ``row``."""

    row: str
    model_path: str
    in_path: str
    out_path: str
    alone: _Agreement = field(default_factory=_Agreement)
    in_model: _Agreement = field(default_factory=_Agreement)
    pending: list[tuple[tuple, dict]] = field(default_factory=list)
    outputs: list[Any] = field(default_factory=list)
    problem: str | None = None


def _get(model: nn.Module, path: str) -> nn.Module | None:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _units(work: nn.Module, reference: nn.Module, rows: dict[str, nn.Module],
           notes: list[str]) -> tuple[list[_Unit], dict[str, str]]:
    """Which module of the model is compared with which of the reference, per row; and rows left out (why)."""
    units: list[_Unit] = []
    missing: dict[str, str] = {}
    paths = _module_paths(work)
    chains: dict[str, list[str]] = {}
    for name, m in rows.items():
        ref = _get(reference, name)
        if ref is not None:
            out_path = name
            bn = m.folded_bn if isinstance(m, CompressedConv) else None
            if bn is not None and paths.get(id(bn)) is not None and _get(reference, paths[id(bn)]) is not None:
                out_path = paths[id(bn)]  # the conv applies its BatchNorm: compare with the BN's output
            units.append(_Unit(name, name, name, out_path))
            continue
        parts = name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            anc = ".".join(parts[:k])
            ref_anc = _get(reference, anc)
            if ref_anc is not None:
                if _is_weight_layer(ref_anc) and anc not in rows:
                    chains.setdefault(anc, []).append(name)
                else:
                    missing[name] = f"the reference has no module {name!r}"
                break
        else:
            missing[name] = f"the reference has no module {name!r}"
    for anc, members in chains.items():
        last = members[-1]
        units.append(_Unit(last, anc, anc, anc))
        for other in members[:-1]:
            missing[other] = f"compared as part of the factor chain {anc!r} (on {last!r})"
    if chains:
        notes.append("layers replaced by factors are compared as a chain with the reference layer they replace: "
                     + ", ".join(f"{a} ({len(ms)} factors, on {ms[-1]})" for a, ms in chains.items()))
    return units, missing


def _prepare_reference(reference: nn.Module, work: nn.Module, example: Any, notes: list[str]) -> nn.Module:
    """The given reference itself, or, when the model folded some of its BatchNorms into convolutions (Identity
    at their path), a copy with those folded the same way."""
    bns = {n: m for n, m in reference.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    folded = [n for n in bns if isinstance(_get(work, n), nn.Identity)]
    if not folded:
        return reference  # only hooked and run in eval mode; the caller restores its modes
    keep = [n for n in bns if n not in folded]
    ref, _ = fold_batch_norm(copy.deepcopy(reference).eval(), example, skip=keep, inplace=True)
    left = [n for n in folded if isinstance(_get(ref, n), nn.modules.batchnorm._BatchNorm)]
    if left:
        notes.append("the model folded these BatchNorms into their convolutions but the reference's could not be "
                     f"folded the same way ({', '.join(left)}): their convolutions are compared with unfolded outputs")
    return ref


class _Samples:
    """What a layer's input quantizer receives: exact min / max / count / clipped count, and a value sample."""

    def __init__(self, lo: float | None, hi: float | None):
        self.lo, self.hi = lo, hi   # the quantizer's rounding bounds (values outside saturate), or None
        self.min, self.max = math.inf, -math.inf
        self.count = self.clipped = 0
        self.kept: list[torch.Tensor] = []
        self.kept_n = 0

    def add(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        v = x.detach().reshape(-1)
        self.min, self.max = min(self.min, float(v.min())), max(self.max, float(v.max()))
        self.count += v.numel()
        if self.lo is not None:
            self.clipped += int(((v < self.lo) | (v > self.hi)).sum())
        room = _SAMPLES_MAX - self.kept_n
        if room > 0:
            step = max(1, math.ceil(v.numel() / _SAMPLES_PER_CALL))
            s = v[::step][:room].float().cpu()
            self.kept.append(s)
            self.kept_n += s.numel()


class _Pair(nn.Module):
    """Runs the reference and then the model on each batch (what a data function calls); returns the model's
    output. Records the first ``limit`` calls."""

    def __init__(self, reference: nn.Module, model: nn.Module, limit: int, after: Callable[[], None]):
        super().__init__()
        self.reference, self.model, self.limit, self.after = reference, model, limit, after
        self.calls = 0

    @property
    def recording(self) -> bool:
        return self.calls < self.limit

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.recording:
            return self.model(*args, **kwargs)
        try:
            self.reference(*args, **kwargs)
            return self.model(*args, **kwargs)
        finally:
            self.calls += 1
            self.after()


def _compare(work: nn.Module, reference: nn.Module, rows: dict[str, nn.Module], static: dict[str, dict[str, Any]],
             data: Any, batches: list[tuple[tuple, dict]] | None, num_batches: int, notes: list[str]) -> int:
    """Run the batches through reference and model with hooks; fill errors and activation data into ``static``."""
    units, missing = _units(work, reference, rows, notes)
    state = {"isolated": False}
    handles = []

    def keep_inputs(unit: _Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if pair.recording:
                unit.pending.append((args, kwargs))
        return hook

    def reference_output(unit: _Unit):
        def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if not pair.recording or not unit.pending:
                return
            a, k = unit.pending.pop(0)
            unit.outputs.append(_snapshot(output))  # kept until the model runs: in-place ops (+=, ReLU) may follow
            if unit.problem is not None:
                return
            state["isolated"] = True
            try:
                mine = work.get_submodule(unit.model_path)(*a, **k)
            except RuntimeError as err:
                unit.problem = f"it does not run on the reference inputs ({str(err).splitlines()[0]})"
                return
            finally:
                state["isolated"] = False
            _add(unit, unit.alone, output, mine)
        return hook

    def model_output(unit: _Unit):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if state["isolated"] or not pair.recording or not unit.outputs or unit.problem is not None:
                return
            _add(unit, unit.in_model, unit.outputs.pop(0), output)
        return hook

    samples: dict[str, _Samples] = {}

    def activation_input(name: str):
        def hook(module: nn.Module, args: tuple) -> None:
            if not state["isolated"] and pair.recording and args:
                samples[name].add(args[0])
        return hook

    def after_batch() -> None:
        for u in units:
            u.pending.clear()
            u.outputs.clear()

    pair = _Pair(reference, work, num_batches, after_batch)
    try:
        for u in units:
            ref_in, ref_out = reference.get_submodule(u.in_path), reference.get_submodule(u.out_path)
            handles.append(ref_in.register_forward_pre_hook(keep_inputs(u), with_kwargs=True))
            handles.append(ref_out.register_forward_hook(reference_output(u), with_kwargs=True))
            handles.append(work.get_submodule(u.model_path).register_forward_hook(model_output(u)))
        for name, m in rows.items():
            act = static[name].get("activation")
            lo = hi = None
            if act is not None and act.scale is not None:
                lo, hi = act.clip_min - act.scale / 2, act.clip_max + act.scale / 2
            samples[name] = _Samples(lo, hi)
            target = m.input_quantizer if isinstance(m, CompressedLayer) and m.input_quantizer is not None else m
            handles.append(target.register_forward_pre_hook(activation_input(name)))
        pair.eval()
        with torch.no_grad():
            if batches is None:
                data(pair)
            else:
                for args, kwargs in batches:
                    pair(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if pair.calls == 0:
        raise ValueError(f"layer_report data: {getattr(data, '__qualname__', 'the data function')}(model) ran no "
                         "batch through the model it was given")
    for u in units:
        row = static[u.row]
        if u.problem is not None:
            missing[u.row] = u.problem
            continue
        if u.alone.batches:
            row["sqnr_db"], row["cosine"] = u.alone.sqnr(), u.alone.cosine()
        if u.in_model.batches:
            row["model_sqnr_db"], row["model_cosine"] = u.in_model.sqnr(), u.in_model.cosine()
        if u.alone.batches or u.in_model.batches:
            row["compared_with"] = u.out_path if u.model_path == u.row else f"{u.out_path} (factor chain)"
        else:
            missing.setdefault(u.row, "it did not run on the data")
    for name, s in samples.items():
        if not s.count:
            continue
        row = static[name]
        act = row.get("activation")
        if s.lo is not None:
            row["activation_clipped"] = s.clipped / s.count
        values = torch.cat(s.kept) if s.kept else torch.zeros(0)
        marks, grid = {}, ()
        if act is not None and act.scale is not None:
            marks = {"clip min": act.clip_min, "clip max": act.clip_max}
            if 2 ** act.bits <= _GRID_MAX_LEVELS:
                grid = [(q - act.offset) * act.scale for q in _levels(act.bits)]
        note = f"sample of {values.numel():,} of {s.count:,} values" if values.numel() < s.count else ""
        if s.lo is not None:
            note = (note + "; " if note else "") + f"{100 * s.clipped / s.count:.2f}% outside the range"
        row["activation_histogram"] = Histogram.of(values, "input value", grid=grid, grid_label="levels",
                                                   marks=marks, note=note)
    if missing:
        notes.append("no output error for: " + "; ".join(f"{n}: {why}" for n, why in missing.items()))
    return pair.calls


def _snapshot(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.detach().clone()
    if isinstance(out, (list, tuple)):
        return [_snapshot(t) for t in out]
    if isinstance(out, dict):
        return {k: _snapshot(v) for k, v in out.items()}
    return out


def _add(unit: _Unit, sums: _Agreement, ref: Any, out: Any) -> None:
    a, b = _tensors(ref), _tensors(out)
    if [t.shape for t in a] != [t.shape for t in b]:
        unit.problem = (f"its output shape {[tuple(t.shape) for t in b]} differs from the reference's "
                        f"{[tuple(t.shape) for t in a]} at {unit.out_path!r}")
        return
    sums.add(ref, out)


# -- the entry point ---------------------------------------------------------------------------------------
def layer_report(model: nn.Module, data: Any = None, example_inputs: Any = None, *, reference: nn.Module | None = None,
                 num_batches: int = 4, input_fn: Callable[[Any], Any] | None = None) -> LayerReport:
    """Per-layer bits, factors, sparsity, unique values, MACs and (with ``data``) output error of any model.

    Args:
        model: a model prepared by any pass (``quantize`` + ``calibrate``, ``prepare_qat``, ``prune_magnitude``,
            ``prune_channels``, ``apply_nm``, ``cluster_weights``, ``decompose``, several in turn) or a float model.
        data: batches to measure the error with (a DataLoader, a list of tensors; ``(x, y)`` uses ``x``; dicts
            are keyword inputs; one tensor is one batch), or a function ``run(model)`` that runs batches through
            the model it is given. Without data the report has no error figures and no activation histograms.
        example_inputs: one batch of model inputs for the MAC count and graph capture (tensor, tuple, or dict of
            keyword inputs). Default: the first batch of ``data``; needed when ``data`` is a function.
        reference: the float model to compare with (see the module docstring); default: the model with its
            compression removed. Only used with ``data``.
        num_batches: how many batches of ``data`` to run (a data function: the first ``num_batches`` calls count).
        input_fn: ``input_fn(batch) -> model inputs`` for batches of another shape (e.g. ``lambda b: b["image"]``).

    Returns a :class:`LayerReport`; ``print(report)`` shows the table. The model is not changed.

    Raises:
        ValueError: no layer to report; ``reference`` without ``data``, or with compressed layers; no example
            input where one is needed; empty data.
        CalibrationError: ``data`` given and the model is quantized but not calibrated.

    Example::

        q = amct_torch.quantize(model, amct_torch.QuantConfig(), x)
        amct_torch.calibrate(q, batches)
        report = layer_report(q, batches, reference=model)
        report.write_html("report.html")
    """
    if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
        raise ValueError(f"layer_report num_batches: got {num_batches!r}; allowed: an int >= 1")
    if input_fn is not None and not callable(input_fn):
        raise TypeError(f"layer_report input_fn: got {type(input_fn).__name__}; allowed: a function batch -> inputs")
    if reference is not None:
        if not isinstance(reference, nn.Module):
            raise TypeError(f"layer_report reference: got {type(reference).__name__}; allowed: the float nn.Module")
        if data is None:
            raise ValueError("layer_report: reference is given but data is not; the reference is only used to "
                             "compare layer outputs: pass data=<batches> as well")
        wrapped = [n for n, m in reference.named_modules() if isinstance(m, CompressedLayer)]
        if wrapped:
            raise ValueError(f"layer_report: reference must be the float model, but it has compressed layers "
                             f"({', '.join(wrapped[:5])}{' ...' if len(wrapped) > 5 else ''}); pass the model "
                             "before compression, or leave reference out to compare with the model's own float layers")
    if not isinstance(model, nn.Module):
        raise TypeError(f"layer_report model: got {type(model).__name__}; allowed: an nn.Module")

    work = copy.deepcopy(model).eval()
    rows = _report_layers(work)
    if not rows:
        raise ValueError("layer_report: the model has no layer to report (no CompressedLayer and no Conv, "
                         "ConvTranspose or Linear layer)")
    notes: list[str] = []
    settings: dict[str, Any] = {"num_batches": num_batches}

    function_data = data is not None and callable(data) and not isinstance(data, (nn.Module, torch.Tensor))
    if isinstance(data, nn.Module):
        raise TypeError(f"layer_report data: got a {type(data).__name__} module; allowed: batches, one tensor, or "
                        "a function that runs batches through the model it is given")
    batches = None
    if data is not None and not function_data:
        batches = _collect_batches(data, num_batches, input_fn)
    if data is not None and quant_layers(work):
        try:
            check_calibrated(work)
        except CalibrationError as err:
            raise CalibrationError(f"layer_report: the output error of a quantized model needs its factors: {err} "
                                   "(or leave data out for a report of the weights alone)") from None
    if example_inputs is None and batches is not None:
        args, kwargs = batches[0]
        example_inputs = kwargs if kwargs else args
    if example_inputs is None and function_data:
        raise ValueError("layer_report: data is a function (it runs the batches itself), so no example input can be "
                         "taken from it; pass example_inputs=<one batch of model inputs> for the MAC count and the "
                         "comparison with the reference")

    with torch.no_grad():
        paths = _module_paths(work)
        static = {name: _static_row(name, m, paths) for name, m in rows.items()}

    total_params = total_macs = None
    if example_inputs is not None:
        flops = count_flops(work, example_inputs)
        counted = {r.name: r for r in flops.layers}
        for name, row in static.items():
            c = counted.get(name)
            if c is not None:
                row["macs"], row["effective_macs"] = c.macs, c.effective_macs
        total_params, total_macs = flops.total_params, flops.total_macs
        idle = [n for n in static if n not in counted]
        if idle:
            notes.append("not called on the example input (no MACs): " + ", ".join(idle))
    else:
        total_params = sum(p.numel() for p in work.parameters())
        notes.append("no example input: MACs not counted (pass example_inputs= or data=)")

    if data is not None:
        if reference is None:
            ref = plain_copy(work, bake=False)
            settings["reference"] = "the model with its compression removed"
        else:
            ref = _prepare_reference(reference, work, example_inputs, notes)
            settings["reference"] = "the given reference model"
        modes = {m: m.training for m in ref.modules()}
        try:
            settings["batches"] = _compare(work, ref, rows, static, data, batches, num_batches, notes)
        finally:
            for m, mode in modes.items():
                m.training = mode
    return LayerReport([LayerRow(**row) for row in static.values()], total_params, total_macs, notes, settings)
