"""``WeightClustering``: weight clustering as a Lightning callback, composing with pruning and QAT, and
``load_compressed_checkpoint``.

The callback schedules :func:`~amct_torch.cluster.cluster_weights`; it holds no algorithm.

* ``setup`` (before ``configure_optimizers``): the cluster stages are created, not yet clustered
  (``defer=True``: the identity until then), so the optimizer and every checkpoint see the centroids from
  the start and a checkpoint of any epoch loads into the same structure. Conv+BatchNorm pairs are folded.
* At the start of epoch ``start_epoch`` the stages cluster what they receive then (the masked weights of
  a pruning callback): schedule it after the pruning schedule has ended. ``reassign_epochs``: at the start
  of those epochs weights move to their nearest centroid.
* Order: mask -> cluster -> fake-quant, whatever order the callbacks are listed in. Each compression
  callback has a ``pipeline_rank`` (pruning 10, clustering 20, QAT 30) and, in its ``setup``, first sets
  up the callbacks of lower rank (their setup is idempotent), so PCQAT is the three callbacks in one Trainer.

Example (PCQAT: prune at once, cluster from epoch 1, QAT throughout)::

    callbacks = [QuantizationAwareTraining(QatConfig()), WeightClustering({"clusters": 16}, start_epoch=1),
                 MagnitudePruning({"sparsity": 0.5, "schedule": "oneshot"})]
    L.Trainer(max_epochs=3, callbacks=callbacks).fit(task, datamodule)
    task = load_compressed_checkpoint(reference_task("resnet_digits"), "checkpoints/last.ckpt")
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import lightning as L
import torch
import torch.nn as nn
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..cluster import activate_clusters, cluster_stage, cluster_weights, clustered_layers, reassign_clusters
from ..config import ClusterConfig, ConfigError, Targeting
from ._common import detached, device_of, example_inputs, metric_name, network, parse_config, setup_earlier_stages

__all__ = ["WeightClustering", "load_compressed_checkpoint"]

_STATE_VERSION = 1


class WeightClustering(Callback):
    """Weight clustering of ``pl_module.<attr>``, starting at an epoch, inside ``Trainer.fit``.

    Args:
        config: a :class:`~amct_torch.ClusterConfig` (clusters, granularity, init, preserve_sparsity...),
            a :class:`~amct_torch.Targeting` of them, or a plain dict of either.
        attr: the LightningModule attribute holding the network.
        start_epoch: the epoch at whose start the weights are clustered (0: at once).
        reassign_epochs: epochs at whose start every weight moves to its nearest centroid.
        example_inputs: inputs for graph capture (default: ``example_input_array``, else the first
            training sample).
        log_unique: log ``cluster/<layer>`` (unique values, per tensor or most per channel) at epoch ends.
        verbose: print the plan at setup.

    Recipe::

        - class_path: amct_torch.lightning.WeightClustering
          init_args: {config: {clusters: 16, granularity: per_channel}, start_epoch: 2}
    """

    pipeline_rank = 20

    def __init__(self, config: Union[ClusterConfig, Targeting, dict[str, Any], None] = None, *, attr: str = "model",
                 start_epoch: int = 0, reassign_epochs: Sequence[int] = (), example_inputs: Any = None,
                 log_unique: bool = True, verbose: bool = False):
        self.config = parse_config(config, ClusterConfig, "WeightClustering")
        if not isinstance(start_epoch, int) or isinstance(start_epoch, bool) or start_epoch < 0:
            raise ConfigError("WeightClustering.start_epoch", start_epoch, "an int >= 0")
        bad = [e for e in reassign_epochs if not isinstance(e, int) or isinstance(e, bool) or e <= start_epoch]
        if bad:
            raise ConfigError("WeightClustering.reassign_epochs", list(reassign_epochs),
                              f"ints > start_epoch ({start_epoch}): weights are reassigned after they are clustered")
        self.attr, self.start_epoch, self.reassign_epochs = attr, start_epoch, tuple(reassign_epochs)
        self.example_inputs, self.log_unique, self.verbose = example_inputs, log_unique, verbose

    def _options(self) -> dict[str, Any]:
        return {"attr": self.attr, "start_epoch": self.start_epoch, "reassign_epochs": list(self.reassign_epochs)}

    def prepare(self, pl_module: L.LightningModule, inputs: Any, *, verbose: bool = False) -> nn.Module:
        """Replace ``pl_module.<attr>`` by its copy with (not yet clustered) cluster stages; returns it."""
        model = network(pl_module, self.attr, "WeightClustering")
        prepared = cluster_weights(model, self.config, move_data_to_device(inputs, device_of(model)), defer=True,
                                   verbose=verbose)
        setattr(pl_module, self.attr, prepared)
        return prepared

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        setup_earlier_stages(trainer, pl_module, self)
        model = network(pl_module, self.attr, "WeightClustering")
        if self.example_inputs is None:
            self.example_inputs, _ = example_inputs(trainer, pl_module, None, "WeightClustering")
        if clustered_layers(model):
            rank_zero_info(f"WeightClustering: {self.attr} has cluster stages already; not preparing again")
            return
        self.prepare(pl_module, self.example_inputs, verbose=self.verbose and trainer.is_global_zero)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = network(pl_module, self.attr, "WeightClustering")
        epoch = trainer.current_epoch
        if epoch >= self.start_epoch:
            done = activate_clusters(model)
            if done:
                rank_zero_info(f"WeightClustering: clustered {len(done)} layers at epoch {epoch}")
        if epoch in self.reassign_epochs:
            moved = reassign_clusters(model)
            rank_zero_info(f"WeightClustering: epoch {epoch}: {sum(moved.values())} weights changed cluster")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.log_unique:
            return
        model = network(pl_module, self.attr, "WeightClustering")
        for name, layer in clustered_layers(model).items():
            stage = cluster_stage(layer)
            if bool(stage.active):
                pl_module.log(metric_name(f"cluster/{name}"), float(stage.unique_values()), on_step=False,
                              on_epoch=True, sync_dist=False)

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"version": _STATE_VERSION, "config": self.config.to_dict(), "options": self._options(),
                "example_inputs": detached(self.example_inputs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("config") != self.config.to_dict() or state_dict.get("options") != self._options():
            rank_zero_warn("WeightClustering: the checkpoint was trained with another config or options "
                           f"(saved: {state_dict.get('config')}, {state_dict.get('options')}); training goes on "
                           "with the callback's own")
        if state_dict.get("example_inputs") is not None:
            self.example_inputs = state_dict["example_inputs"]

    @staticmethod
    def _rebuild(module: L.LightningModule, state: dict[str, Any], inputs: Any) -> None:
        opts = state["options"]
        cb = WeightClustering(state["config"], attr=opts["attr"], start_epoch=opts["start_epoch"],
                              reassign_epochs=tuple(opts["reassign_epochs"]))
        model = network(module, cb.attr, "load_compressed_checkpoint")
        if not clustered_layers(model):
            cb.prepare(module, inputs)


def _ranked_states(checkpoint: dict[str, Any]) -> list[tuple[int, str, dict[str, Any]]]:
    from .decompose import TensorDecomposition
    from .pruning import _CALLBACKS as PRUNING
    from .qat import QuantizationAwareTraining

    known = dict(PRUNING)
    known["TensorDecomposition"] = TensorDecomposition
    known["WeightClustering"] = WeightClustering
    known["QuantizationAwareTraining"] = QuantizationAwareTraining
    out = []
    for key, state in (checkpoint.get("callbacks") or {}).items():
        name = str(key).split("{", 1)[0]
        if name in known:
            out.append((known[name].pipeline_rank, name, state))
    return sorted(out, key=lambda t: t[0])


def load_compressed_checkpoint(module: L.LightningModule, ckpt_path: Union[str, os.PathLike], *,
                               example_inputs: Any = None, map_location: Any = "cpu", strict: bool = True,
                               weights_only: bool = True, allow_plain: bool = False) -> L.LightningModule:
    """Load a checkpoint of a fit with any of the compression callbacks (decomposition, pruning, clustering,
    QAT) into a fresh LightningModule holding the float network: the structure is rebuilt from the callbacks'
    saved states in pipeline order (factors, then masks, then clusters, then quantizers), then the
    ``state_dict`` loads.

    ``allow_plain``: a checkpoint without any compression-callback state loads as a plain one (instead of
    raising ``ValueError``).

    Example::

        task = load_compressed_checkpoint(reference_task("resnet_digits"), "checkpoints/last.ckpt")
        amct_torch.export(task.model.eval(), "out/pcqat", x)
    """
    from .decompose import TensorDecomposition
    from .pruning import _CALLBACKS as PRUNING
    from .qat import QuantizationAwareTraining

    path = os.fspath(ckpt_path)
    checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    if "state_dict" not in checkpoint:
        raise ValueError(f"{path}: not a Lightning checkpoint (no 'state_dict'; keys: {', '.join(map(str, checkpoint))})")
    states = _ranked_states(checkpoint)
    if not states and allow_plain:      # a fit without compression callbacks: the weights load as they are
        module.load_state_dict(checkpoint["state_dict"], strict=strict)
        return module
    if not states:
        found = ", ".join(map(str, checkpoint.get("callbacks") or {})) or "none"
        raise ValueError(f"{path}: no state of a compression callback in the checkpoint (callback states in it: "
                         f"{found}); checkpoints saved with save_weights_only=True carry none")
    for _, name, state in states:
        inputs = example_inputs if example_inputs is not None else state.get("example_inputs")
        if name == "QuantizationAwareTraining":
            cb = QuantizationAwareTraining.from_state(state)
            if example_inputs is not None:
                cb.example_inputs = example_inputs
            cb.prepare(module, cb.example_inputs)
            continue
        if name == "TensorDecomposition":
            TensorDecomposition._rebuild(module, state, inputs)
            continue
        if inputs is None:
            raise ValueError(f"{path}: the {name} state carries no example input; pass example_inputs=...")
        (WeightClustering if name == "WeightClustering" else PRUNING[name])._rebuild(module, state, inputs)
    module.load_state_dict(checkpoint["state_dict"], strict=strict)
    for _, name, state in states:
        if name == "QuantizationAwareTraining":
            cb = QuantizationAwareTraining.from_state(state)
            cb._module = module
            cb._apply_frozen()
    return module
