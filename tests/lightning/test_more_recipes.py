"""The recipes not covered by test_recipe.py / test_pruning_recipes.py, each run through the CLI in a shortened
form (the recipe as written plus trainer overrides), `amct-torch export` on their checkpoints, and the errors a
malformed recipe gets."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml

from amct_torch.cli import main
from amct_torch.lightning import load_compressed_checkpoint
from amct_torch.zoo import reference_datamodule, reference_task

ROOT = Path(__file__).resolve().parents[2]
RECIPES = ROOT / "recipes"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def recipe(name):
    return str(RECIPES / name)


def test_every_recipe_is_tested():
    """A recipe added without a test fails here: each name must appear in one of the recipe test files."""
    here = Path(__file__).parent
    text = "".join((here / f).read_text() for f in ("test_recipe.py", "test_pruning_recipes.py", "test_more_recipes.py"))
    text += (ROOT / "tests" / "test_cli.py").read_text()
    missing = [p.name for p in RECIPES.glob("*.yaml") if p.name not in text]
    assert not missing, f"recipes without a test: {missing}"


def test_ptq_recipe_validates_fp32_and_quantized_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["validate", "--config", recipe("ptq_resnet_digits.yaml"), "--trainer.limit_val_batches=2", *QUIET])
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["ptq_resnet_digits_deploy_model.onnx",
                                                     "ptq_resnet_digits_fake_quant_model.onnx",
                                                     "ptq_resnet_digits_record.txt"]
    assert "layer3.2.conv2" in (out / "ptq_resnet_digits_record.txt").read_text()


def test_cluster_recipe_clusters_and_exports_a_float_model_with_16_values_per_channel(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", recipe("cluster_resnet_digits.yaml"), "--trainer.max_epochs=1",
          "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *QUIET])
    proto = onnx.load(tmp_path / "out" / "cluster_resnet_digits_fp32_model.onnx")
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    convs = [w for w in weights.values() if w.ndim == 4 and w.shape[1] > 1]
    assert convs
    for w in convs:
        assert max(len(np.unique(c)) for c in w) <= 16


@pytest.fixture(scope="module")
def decomposed_ckpt(tmp_path_factory):
    work = tmp_path_factory.mktemp("decompose")
    cwd = Path.cwd()
    try:
        import os
        os.chdir(work)
        main(["fit", "--config", recipe("decompose_resnet_digits.yaml"), "--trainer.max_epochs=1",
              "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", *QUIET])
    finally:
        os.chdir(cwd)
    return work


def test_decompose_recipe_writes_info_checkpoint_and_onnx(decomposed_ckpt):
    out = decomposed_ckpt / "out"
    info = yaml.safe_load((out / "decompose_resnet_digits_info.json").read_text())
    assert info["layers"] and all(v["method"] == "tucker2" for v in info["layers"].values())
    task = load_compressed_checkpoint(reference_task("resnet_digits"), out / "decompose_resnet_digits_ckpt" / "last.ckpt")
    assert isinstance(task.model.get_submodule(next(iter(info["layers"]))), torch.nn.Sequential)
    assert (out / "decompose_resnet_digits_fp32_model.onnx").exists()


def test_export_command_rebuilds_a_decomposed_checkpoint(decomposed_ckpt, tmp_path, capsys):
    ckpt = decomposed_ckpt / "out" / "decompose_resnet_digits_ckpt" / "last.ckpt"
    main(["export", "--config", recipe("decompose_resnet_digits.yaml"), "--ckpt_path", str(ckpt),
          "--output", str(tmp_path / "dec"), "--dynamic_batch"])
    assert f"fp32: {tmp_path / 'dec_fp32_model.onnx'}" in capsys.readouterr().out
    task = load_compressed_checkpoint(reference_task("resnet_digits"), ckpt).eval()
    x = reference_datamodule("resnet_digits").example_input(4)
    y_ort = ort.InferenceSession(str(tmp_path / "dec_fp32_model.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(y_ort, task(x).numpy(), atol=1e-4)


def test_multistage_recipe_prunes_clusters_quantizes_and_exports(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", recipe("multistage_resnet_digits.yaml"), "--trainer.max_epochs=4",
          "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1", *QUIET])
    out = tmp_path / "out"
    for suffix in ("deploy_model.onnx", "fake_quant_model.onnx", "record.txt"):
        assert (out / f"multistage_resnet_digits_{suffix}").exists(), suffix
    from amct_torch import check_preservation
    task = load_compressed_checkpoint(reference_task("resnet_digits"), out / "multistage_resnet_digits_ckpt" / "last.ckpt")
    report = check_preservation(task.model)
    report.raise_if_broken()
    rows = {r.name: r for r in report.layers} if hasattr(report, "layers") else {}
    sd = task.model.state_dict()
    masks = [v for k, v in sd.items() if k.endswith("weight_pipeline.0.mask")]
    assert masks and sum(float((m == 0).float().mean()) for m in masks) / len(masks) > 0.5   # pruned to ~60 %
    assert all(bool(v) for k, v in sd.items() if k.endswith("weight_pipeline.1.active"))    # clustered
    # and the export command gives the same three files from the last checkpoint
    main(["export", "--config", recipe("multistage_resnet_digits.yaml"), "--ckpt_path",
          str(out / "multistage_resnet_digits_ckpt" / "last.ckpt"), "--output", str(tmp_path / "again")])
    assert (tmp_path / "again_deploy_model.onnx").exists() and (tmp_path / "again_record.txt").exists()


def test_kv_cache_recipe_logs_both_perplexities_and_writes_the_record(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["validate", "--config", recipe("kv_cache_gpt_shakespeare.yaml"), "--trainer.limit_val_batches=4",
          "--data.init_args.batch_size=4", *QUIET])
    assert "kv_cache_value" in (tmp_path / "out" / "kv_cache_gpt_shakespeare_record.txt").read_text()


def test_malformed_recipes_get_errors_naming_the_key(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    bad = yaml.safe_load((RECIPES / "decompose_resnet_digits.yaml").read_text())
    bad["trainer"]["max_epoch"] = bad["trainer"].pop("max_epochs")
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "typo.yaml")])
    assert "max_epoch" in capsys.readouterr().err

    bad = yaml.safe_load((RECIPES / "decompose_resnet_digits.yaml").read_text())
    bad["trainer"]["callbacks"][0]["init_args"]["config"]["macs_ratio"] = 2.0
    (tmp_path / "value.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises((SystemExit, Exception)) as err:
        main(["fit", "--config", str(tmp_path / "value.yaml")])
    assert "macs_ratio" in capsys.readouterr().err + str(err.value)

    (tmp_path / "broken.yaml").write_text("trainer:\n  max_epochs: 1\n   callbacks: [\n")
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "broken.yaml")])
    err = capsys.readouterr().err
    assert "line" in err


def test_export_command_errors(tmp_path):
    with pytest.raises(SystemExit, match="no such file"):
        main(["export", "--config", recipe("decompose_resnet_digits.yaml"), "--ckpt_path", str(tmp_path / "none.ckpt")])
