"""``TensorDecomposition``: tensor decomposition as a Lightning callback (decompose, then fine-tune).

The callback schedules :func:`~amct_torch.decompose.decompose`; it holds no algorithm.

* ``setup`` (before ``configure_optimizers``): ``pl_module.<attr>`` is replaced by its decomposed copy
  (Conv2d by AMCT's kx1 + 1xk split or Tucker-2, Linear by truncated SVD, ranks by EVBMF, an energy or a
  MACs target), so the optimizer trains the factors from the first step. The plan (rank, parameters and
  MACs per layer) is logged as ``decompose/macs_ratio`` and ``decompose/params_ratio``.
* Decomposition comes first in the pipeline (``pipeline_rank`` 5): with pruning, clustering or QAT
  callbacks in the same Trainer, those act on the factors, whatever order the callbacks are listed in.
* Checkpoints carry the decomposition info (each layer's method, ranks and factor shapes), so
  ``trainer.fit(ckpt_path=...)`` resumes and :func:`~amct_torch.lightning.load_compressed_checkpoint`
  rebuilds the decomposed structure on a fresh module before the weights load. ``info_path`` also writes
  the info JSON (AMCT's ``decompose_info``; :func:`~amct_torch.decompose.apply_decomposition_info` reads it).

Example (half the MACs, then three epochs of fine-tuning)::

    cb = TensorDecomposition({"conv_method": "tucker2", "rank_selection": "macs", "macs_ratio": 0.5})
    L.Trainer(max_epochs=3, callbacks=[cb]).fit(task, datamodule)
    task = load_compressed_checkpoint(reference_task("resnet_digits"), "checkpoints/last.ckpt")

Recipe::

    - class_path: amct_torch.lightning.TensorDecomposition
      init_args: {config: {conv_method: tucker2, rank_selection: macs, macs_ratio: 0.5}}
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import lightning as L
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..config import ConfigError, DecomposeConfig, Targeting
from ..decompose import apply_decomposition_info, decompose, save_decomposition_info
from ._common import detached, device_of, example_inputs, network, parse_config, setup_earlier_stages

__all__ = ["TensorDecomposition"]

_STATE_VERSION = 1


class TensorDecomposition(Callback):
    """Decompose ``pl_module.<attr>`` into low-rank factors at the start of ``Trainer.fit``.

    Args:
        config: a :class:`~amct_torch.config.DecomposeConfig` (``conv_method``, ``rank_selection``,
            ``macs_ratio``, ``energy``...), a :class:`~amct_torch.Targeting` of them, or a plain dict of either.
            Default: AMCT's choice (spatial split, EVBMF ranks).
        attr: the LightningModule attribute holding the network.
        ranks: explicit ranks per module path, overriding the selection for those layers.
        layers: only these module paths or globs; skip: these are left alone.
        example_inputs: inputs for counting MACs (default: ``example_input_array``, else the first training
            sample).
        info_path: also write the decomposition info JSON here (on global rank 0).
        verbose: print the plan at setup.
    """

    pipeline_rank = 5

    def __init__(self, config: Union[DecomposeConfig, Targeting, dict[str, Any], None] = None, *, attr: str = "model",
                 ranks: Optional[Mapping[str, Any]] = None, layers: Optional[Sequence[str]] = None,
                 skip: Sequence[str] = (), example_inputs: Any = None,
                 info_path: Union[str, os.PathLike, None] = None, verbose: bool = False):
        self.config = parse_config(config, DecomposeConfig, "TensorDecomposition")
        if ranks is not None and not isinstance(ranks, Mapping):
            raise ConfigError("TensorDecomposition.ranks", ranks, "a mapping of module path -> rank")
        for name, value in (("layers", layers), ("skip", skip)):
            if value is not None and (isinstance(value, str) or not all(isinstance(v, str) for v in value)):
                raise ConfigError(f"TensorDecomposition.{name}", value, "a list of module paths or globs")
        self.attr, self.verbose = attr, verbose
        self.ranks = None if ranks is None else {str(k): (list(v) if isinstance(v, (list, tuple)) else v)
                                                 for k, v in ranks.items()}
        self.layers = None if layers is None else list(layers)
        self.skip = list(skip)
        self.example_inputs, self.info_path = example_inputs, info_path
        self.info: Optional[dict[str, Any]] = None
        self.plan = None

    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr, "ranks": self.ranks, "layers": self.layers, "skip": self.skip}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        setup_earlier_stages(trainer, pl_module, self)
        model = network(pl_module, self.attr, "TensorDecomposition")
        if self._decomposed(model):
            rank_zero_info(f"TensorDecomposition: {self.attr} is decomposed already; not decomposing again")
            return
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "TensorDecomposition")
        ranks = None if self.ranks is None else {k: (tuple(v) if isinstance(v, list) else v)
                                                 for k, v in self.ranks.items()}
        decomposed, plan = decompose(model, self.config, move_data_to_device(self.example_inputs, device_of(model)),
                                     ranks=ranks, layers=self.layers, skip=self.skip,
                                     verbose=self.verbose and trainer.is_global_zero)
        if not any(lp.decomposed for lp in plan.layers):
            rank_zero_warn("TensorDecomposition: no layer was decomposed (print the plan with verbose=True to see "
                           "each layer's reason); training goes on with the undecomposed network")
        self.plan, self.info = plan, plan.info()
        setattr(pl_module, self.attr, decomposed)
        if self.info_path is not None and trainer.is_global_zero:
            save_decomposition_info(self.info, self.info_path)
        rank_zero_info(f"TensorDecomposition: {self.attr}: {str(plan).splitlines()[0]}")

    def _decomposed(self, model: nn.Module) -> bool:
        """Whether ``model`` has this callback's factors (setup runs once per network, and again for a new one)."""
        if not self.info or not self.info.get("layers"):
            return False
        try:
            return all(isinstance(model.get_submodule(name), nn.Sequential) for name in self.info["layers"])
        except AttributeError:
            return False

    def ratios(self) -> dict[str, float]:
        """The whole model's parameters and (with example inputs) MACs after / before the decomposition."""
        if self.plan is None:
            return {}
        t = self.plan.totals()
        out = {"params_ratio": t["model_params_after"] / max(t["model_params_before"], 1)}
        if t["model_macs_before"]:
            out["macs_ratio"] = t["model_macs_after"] / t["model_macs_before"]
        return out

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for key, value in self.ratios().items():
            pl_module.log(f"decompose/{key}", value, on_step=False, on_epoch=True, sync_dist=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "info": self.info, "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("info") is not None and self.info is not None and state_dict["info"] != self.info:
            rank_zero_warn("TensorDecomposition: the checkpoint's decomposition differs from the one made at setup "
                           "(another config, ranks or model); its weights will not fit the factors")

    @staticmethod
    def _rebuild(module: L.LightningModule, state: dict[str, Any], inputs: Any) -> None:
        attr = state["options"]["attr"]
        model = network(module, attr, "load_compressed_checkpoint")
        if state.get("info") is None:
            raise ValueError("the TensorDecomposition state carries no decomposition info")
        rebuilt, _ = apply_decomposition_info(model, state["info"])
        setattr(module, attr, rebuilt)

