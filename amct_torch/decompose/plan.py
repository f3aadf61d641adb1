"""The decomposition plan: per layer, what is (or would be) done, with which rank, and what it costs.

    plan = plan_decomposition(model, DecomposeConfig(rank_selection="macs", macs_ratio=0.5), x)
    print(plan)            # one row per Conv2d/Linear: method, decomposed or why not, rank(s), params and MACs
    plan["layer1.0.conv1"].macs_after, plan.totals(), plan.changes(), plan.info()

MACs are counted as :func:`amct_torch.analysis.flops.count_flops` counts them, for the example input the
plan was made with (``None`` when there was none: then savings are judged by parameters).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..graph.plan import render_table

__all__ = ["LayerDecomposition", "DecompositionPlan", "INFO_FORMAT", "INFO_VERSION"]

INFO_FORMAT = "amct_torch.decomposition"
INFO_VERSION = 1

Action = Literal["decompose", "skip", "ineligible"]


def _fmt(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _ratio(before: float | None, after: float | None) -> str:
    if before is None or after is None or before == 0:
        return "-"
    return f"{100.0 * (after - before) / before:+.1f}%"


@dataclass
class LayerDecomposition:
    """One layer's line in a :class:`DecompositionPlan`.

    Attributes:
        name: module path; type: ``Conv2d`` / ``Linear`` (or the unsupported conv type).
        method: ``spatial``, ``tucker2`` or ``svd`` (Linear); empty when no method applies.
        action: ``decompose``; ``skip`` (not selected, left alone by the targeting, or would not pay);
            ``ineligible`` (the method cannot or should not apply: depthwise, 1x1 kernel, stride 3, ...).
        reason: why not (``skip`` / ``ineligible``); for ``decompose`` a note (e.g. a capped rank).
        source: the targeting entry that gave the layer its config.
        rank: the chosen rank (``[r_in, r_out]`` for Tucker-2), also for a layer skipped because it would
            not pay; ``full_rank``: where the decomposition is exact.
        selection: how the rank was chosen (``evbmf 23 -> 32 (x16)``, ``energy 0.9``, ``macs``, ``fixed``).
        energy: fraction of the squared singular values the rank keeps (Tucker-2: the HOSVD lower bound
            ``e_in + e_out - 1`` from both unfoldings).
        params_before / params_after, macs_before / macs_after: the layer's parameters and MACs (for the
            plan's example input; ``None`` without one) before and after (after = before when not decomposed).
        args: the layer's constructor arguments; factors: the factors' ``{"name", "type", "args"}`` when decomposed.
    """

    name: str
    layer_type: str
    method: str
    action: Action
    reason: str = ""
    source: str = ""
    rank: int | list[int] | None = None
    full_rank: int | list[int] | None = None
    selection: str = ""
    energy: float | None = None
    params_before: int = 0
    params_after: int = 0
    macs_before: int | None = None
    macs_after: int | None = None
    args: dict[str, Any] = field(default_factory=dict)
    factors: list[dict[str, Any]] = field(default_factory=list)

    @property
    def decomposed(self) -> bool:
        return self.action == "decompose"

    def factor_names(self) -> list[str]:
        return [f["name"] for f in self.factors]


@dataclass
class DecompositionPlan:
    """Every Conv2d/Linear of a model with its decomposition decision, the totals and the target reached.

    ``model_params`` / ``model_macs``: the whole model's parameters and MACs before (MACs as
    :func:`~amct_torch.analysis.flops.count_flops` counts them; ``None`` without an example input).
    ``target``: for ``rank_selection='macs'``: the budget and what was reached.
    """

    config: dict[str, Any]
    layers: list[LayerDecomposition] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model_params: int = 0
    model_macs: int | None = None
    target: dict[str, Any] = field(default_factory=dict)
    title: str = "decompose"

    # -- queries -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> LayerDecomposition:
        for lp in self.layers:
            if lp.name == name:
                return lp
        raise KeyError(f"no layer {name!r} in the decomposition plan; layers: {', '.join(lp.name for lp in self.layers)}")

    def decomposed(self) -> list[str]:
        """Names of the layers decomposed (or to be)."""
        return [lp.name for lp in self.layers if lp.decomposed]

    def skipped(self) -> dict[str, str]:
        """Names of the layers not decomposed -> why."""
        return {lp.name: lp.reason for lp in self.layers if not lp.decomposed}

    def changes(self) -> dict[str, list[str]]:
        """AMCT's changes dict: ``{'conv1': ['conv1.0', 'conv1.1'], ...}``."""
        return {lp.name: lp.factor_names() for lp in self.layers if lp.decomposed}

    def totals(self) -> dict[str, Any]:
        """Sums over the listed layers and, where known, the whole model (before -> after)."""
        params_b = sum(lp.params_before for lp in self.layers)
        params_a = sum(lp.params_after for lp in self.layers)
        known = self.model_macs is not None
        macs_b = sum(lp.macs_before or 0 for lp in self.layers) if known else None
        macs_a = sum(lp.macs_after or 0 for lp in self.layers) if known else None
        dec = [lp for lp in self.layers if lp.decomposed]
        out = {"layers": len(self.layers), "decomposed": len(dec),
               "params_before": params_b, "params_after": params_a, "macs_before": macs_b, "macs_after": macs_a,
               "model_params_before": self.model_params,
               "model_params_after": self.model_params - sum(lp.params_before - lp.params_after for lp in dec),
               "model_macs_before": self.model_macs,
               "model_macs_after": None if not known else
               self.model_macs - sum((lp.macs_before or 0) - (lp.macs_after or 0) for lp in dec)}
        return out

    # -- the decomposition info (what rebuilds the structure) -----------------------------------
    def info(self) -> dict[str, Any]:
        """The decomposition info: for each decomposed layer its type and constructor arguments, the
        method, the rank(s) and every factor's name, type and constructor arguments (JSON-ready).
        :func:`~amct_torch.decompose.apply_decomposition_info` rebuilds the structure from it."""
        return {"format": INFO_FORMAT, "version": INFO_VERSION,
                "layers": {lp.name: {"type": lp.layer_type, "args": lp.args, "method": lp.method, "rank": lp.rank,
                                     "factors": [dict(f) for f in lp.factors]}
                           for lp in self.layers if lp.decomposed}}

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "config": self.config, "layers": [asdict(lp) for lp in self.layers],
                "totals": self.totals(), "target": dict(self.target), "warnings": list(self.warnings)}

    # -- printing ------------------------------------------------------------------------------
    def table(self) -> str:
        def rank_text(lp: LayerDecomposition) -> str:
            if lp.rank is None:
                return "-"
            show = lambda r: f"{r[0]},{r[1]}" if isinstance(r, list) else str(r)  # noqa: E731
            return show(lp.rank) + ("" if lp.full_rank is None else f"/{show(lp.full_rank)}")

        def cost_text(before: int | None, after: int | None) -> str:
            return "-" if before is None else f"{_fmt(before)} -> {_fmt(after)}"

        def change(p_before: int, p_after: int, m_before: int | None, m_after: int | None) -> str:
            return _ratio(m_before, m_after) if m_before else _ratio(p_before, p_after)

        rows = [(lp.name, lp.layer_type, lp.method or "-", lp.action, rank_text(lp), lp.selection or "-",
                 "-" if lp.energy is None else f"{lp.energy:.3f}", cost_text(lp.params_before, lp.params_after),
                 cost_text(lp.macs_before, lp.macs_after),
                 change(lp.params_before, lp.params_after, lp.macs_before, lp.macs_after), lp.reason, lp.source)
                for lp in self.layers]
        t = self.totals()
        rows.append(("total", "", "", f"{t['decomposed']} of {t['layers']}", "", "", "",
                     cost_text(t["params_before"], t["params_after"]), cost_text(t["macs_before"], t["macs_after"]),
                     change(t["params_before"], t["params_after"], t["macs_before"], t["macs_after"]), "", ""))
        return render_table(["layer", "type", "method", "action", "rank", "selection", "energy", "params", "MACs",
                             "change", "detail", "decided by"], rows)

    def __str__(self) -> str:
        t = self.totals()
        head = (f"{self.title}: {t['decomposed']} of {t['layers']} layers; model params "
                f"{_fmt(t['model_params_before'])} -> {_fmt(t['model_params_after'])} "
                f"({_ratio(t['model_params_before'], t['model_params_after'])})")
        if t["model_macs_before"] is not None:
            head += (f", model MACs {_fmt(t['model_macs_before'])} -> {_fmt(t['model_macs_after'])} "
                     f"({_ratio(t['model_macs_before'], t['model_macs_after'])})")
        else:
            head += ", MACs not counted (no example input)"
        parts = [head]
        if self.target:
            tg = self.target
            parts.append(f"target: {tg['ratio']:g} of the {tg['scope']} MACs = {_fmt(tg['budget'])}; reached "
                         f"{_fmt(tg['reached'])} ({tg['reached_ratio']:.3f}); energy threshold {tg['energy_threshold']:.4f}")
        parts.append(self.table())
        parts += [f"warning: {w}" for w in self.warnings]
        return "\n".join(parts)

    def __repr__(self) -> str:
        return f"DecompositionPlan(layers={len(self.layers)}, decomposed={len(self.decomposed())})"
