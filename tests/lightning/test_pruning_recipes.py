"""recipes/prune_channels_resnet_digits.yaml and recipes/sparsity_2to4_resnet_digits.yaml run through the CLI
(one epoch of 2 batches: a fast_dev_run that still writes checkpoints), and their results load back."""

from pathlib import Path

import torch

from amct_torch.analysis import count_flops
from amct_torch.cli import main
from amct_torch.lightning import load_pruned_checkpoint
from amct_torch.sparsity import ShrinkRecord, mask_stage, masked_layers, nm_layers, shrink
from amct_torch.zoo import ImageClassifier, ResNetDigits, reference_datamodule

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
         "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.init_args.batch_size=8"]


def fresh():
    return ImageClassifier(ResNetDigits(depth=20))  # the dense ResNet-20, untrained: everything comes from the files


def test_channel_pruning_recipe_shrinks_to_half_the_macs_and_its_files_rebuild_the_network(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "recipes" / "prune_channels_resnet_digits.yaml"), *QUICK])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        "prune_channels_resnet_digits.ckpt", "prune_channels_resnet_digits.shrink.json"]
    x = reference_datamodule("resnet_digits").example_input(1)
    small = load_pruned_checkpoint(fresh(), out / "prune_channels_resnet_digits.ckpt").model.eval()
    dense = ResNetDigits(depth=20).eval()
    with torch.no_grad():
        assert count_flops(small, x).total_macs <= 0.5 * count_flops(dense, x).total_macs  # flops_target: 0.5
    assert not masked_layers(small)
    # the last checkpoint of the fit holds the masked network: it reloads masked, and shrinks to the same network
    masked = load_pruned_checkpoint(fresh(), out / "prune_channels_resnet_digits_ckpt" / "last.ckpt").model.eval()
    assert masked_layers(masked)
    again, record = shrink(masked, x)
    assert record.to_dict() == ShrinkRecord.load(out / "prune_channels_resnet_digits.shrink.json").to_dict()
    xs = reference_datamodule("resnet_digits").example_input(4)
    with torch.no_grad():
        torch.testing.assert_close(again(xs), small(xs), rtol=1e-5, atol=1e-5)


def test_2to4_recipe_fine_tunes_a_network_with_2_of_every_4_input_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "recipes" / "sparsity_2to4_resnet_digits.yaml"), *QUICK])
    task = load_pruned_checkpoint(fresh(), tmp_path / "out" / "sparsity_2to4_resnet_digits_ckpt" / "last.ckpt")
    layers = nm_layers(task.model)
    assert "conv1" not in layers and len(layers) == 21  # 18 block convs, 2 downsamples, fc; the stem stays dense
    for name, layer in layers.items():
        assert int(mask_stage(layer).batches) == 2, name
        kept = mask_stage(layer).mask.movedim(1, -1).reshape(-1, 4).sum(-1)
        assert torch.equal(kept, torch.full_like(kept, 2.0)), name


def test_pcqat_recipe_prunes_clusters_quantizes_and_exports_what_it_preserved(tmp_path, monkeypatch):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from amct_torch import check_preservation
    from amct_torch.cluster import cluster_stage, clustered_layers
    from amct_torch.lightning import load_compressed_checkpoint

    monkeypatch.chdir(tmp_path)
    quick = ["--trainer.max_epochs=3", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1",
             "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
             "--data.init_args.batch_size=8"]  # 3 epochs: clustering starts at epoch 2
    main(["fit", "--config", str(ROOT / "recipes" / "pcqat_resnet_digits.yaml"), *quick])
    task = load_compressed_checkpoint(fresh(), tmp_path / "out" / "pcqat_resnet_digits_ckpt" / "last.ckpt")
    layers = clustered_layers(task.model)
    assert len(layers) == 22 and all(bool(cluster_stage(m).active) for m in layers.values())
    report = check_preservation(task.model)
    assert report.ok and len(report.rows) == 22
    deploy = onnx.load(tmp_path / "out" / "pcqat_resnet_digits_deploy_model.onnx")
    weights = {i.name: numpy_helper.to_array(i) for i in deploy.graph.initializer}
    for name in layers:
        w = weights[f"{name}.weight"]
        assert w.dtype == np.int8 and len(np.unique(w)) <= 16 and (w == 0).mean() >= 0.5 - 1e-3, name
