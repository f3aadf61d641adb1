"""WeightClustering with MagnitudePruning and QuantizationAwareTraining in one real Trainer.fit (PCQAT):
the pipeline order does not depend on the callback order, clusters start at their epoch, zeros and cluster
counts survive QAT, and a checkpoint resumes and reloads the whole pipeline."""

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from amct_torch import ClusterConfig, ConfigError, MagnitudeConfig, QatConfig, check_preservation
from amct_torch.cluster import ClusterStage, cluster_stage, clustered_layers
from amct_torch.lightning import (MagnitudePruning, QuantizationAwareTraining, WeightClustering,
                                  load_compressed_checkpoint)
from amct_torch.quant import ArqWeightQuantizer
from amct_torch.sparsity import MaskStage
from lightning_helpers import Probe, loaders, outputs, task, trainer

PRUNE = MagnitudeConfig(sparsity=0.5, schedule="oneshot")
CLUSTER = ClusterConfig(clusters=8)


def callbacks(order):
    made = {"prune": MagnitudePruning(PRUNE), "cluster": WeightClustering(CLUSTER, start_epoch=1),
            "qat": QuantizationAwareTraining(QatConfig(batch_num=1))}
    return [made[k] for k in order], made


@pytest.fixture(scope="module")
def pcqat_run(digits, tmp_path_factory):
    ckpt_dir = tmp_path_factory.mktemp("pcqat")
    train, val = loaders(digits)
    t = task()
    seen = {}

    def probe(tr, module, hook):
        layers = clustered_layers(module.model)
        seen[tr.current_epoch] = {n: bool(cluster_stage(l).active) for n, l in layers.items()}

    cbs, made = callbacks(["qat", "cluster", "prune"])  # listed in the "wrong" order on purpose
    cbs += [ModelCheckpoint(dirpath=ckpt_dir, save_top_k=-1, every_n_epochs=1), Probe(probe, "on_train_epoch_end")]
    trainer(max_epochs=2, callbacks=cbs).fit(t, train, val)
    return {"task": t, "made": made, "active": seen, "first": ckpt_dir / "epoch=0-step=3.ckpt",
            "last": ckpt_dir / "epoch=1-step=6.ckpt", "x": digits.val[0][:8], "loaders": (train, val)}


def test_pipelines_are_mask_cluster_quant_whatever_the_callback_order(pcqat_run):
    layers = clustered_layers(pcqat_run["task"].model)
    assert layers
    for name, layer in layers.items():
        kinds = [type(s) for s in layer.weight_pipeline]
        assert kinds[0] is MaskStage and kinds[1] is ClusterStage and issubclass(kinds[-1], ArqWeightQuantizer), name


def test_clusters_start_at_their_epoch_and_preserve_zeros_and_counts_through_qat(pcqat_run):
    active = pcqat_run["active"]
    assert not any(active[0].values()) and all(active[1].values())
    model = pcqat_run["task"].model
    for layer in clustered_layers(model).values():
        assert cluster_stage(layer).unique_values() <= 8
    report = check_preservation(model)
    assert report.rows and report.ok


def test_resume_from_a_checkpoint_before_clustering_ends_like_the_uninterrupted_run(pcqat_run):
    t = task()
    cbs, _ = callbacks(["prune", "cluster", "qat"])
    trainer(max_epochs=2, callbacks=cbs).fit(t, *pcqat_run["loaders"], ckpt_path=pcqat_run["first"])
    a, b = t.state_dict(), pcqat_run["task"].state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_load_compressed_checkpoint_rebuilds_masks_clusters_and_quantizers(pcqat_run):
    fresh = load_compressed_checkpoint(task(), pcqat_run["last"])
    assert set(clustered_layers(fresh.model)) == set(clustered_layers(pcqat_run["task"].model))
    assert torch.equal(outputs(fresh.model, pcqat_run["x"]), outputs(pcqat_run["task"].model, pcqat_run["x"]))


def test_bad_schedule_is_rejected_with_the_key():
    with pytest.raises(ConfigError, match="WeightClustering.reassign_epochs"):
        WeightClustering(CLUSTER, start_epoch=2, reassign_epochs=[1])
    with pytest.raises(ConfigError, match="WeightClustering.start_epoch"):
        WeightClustering(CLUSTER, start_epoch=-1)
