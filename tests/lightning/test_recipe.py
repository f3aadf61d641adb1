"""recipes/qat_resnet_digits.yaml runs through the CLI: QAT on the pretrained ResNet-20, then the export."""

from pathlib import Path

import onnx

from amct_torch.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_qat_recipe_fine_tunes_and_exports_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "recipes" / "qat_resnet_digits.yaml"), "--trainer.fast_dev_run=true",
          "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
          "--data.init_args.batch_size=8"])
    out = tmp_path / "out"
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    assert files == ["qat_resnet_digits_deploy_model.onnx", "qat_resnet_digits_fake_quant_model.onnx",
                     "qat_resnet_digits_record.txt"]
    deploy = {n.op_type for n in onnx.load(out / "qat_resnet_digits_deploy_model.onnx").graph.node}
    assert {"AscendQuant", "AscendDequant"} <= deploy
    assert "layer3.2.conv2" in (out / "qat_resnet_digits_record.txt").read_text()  # ResNet-20: the pretrained one
