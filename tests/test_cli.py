from pathlib import Path

import pytest

from amct_torch.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_fit_runs_a_recipe_with_fast_dev_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "recipes" / "fit_resnet_digits.yaml"), "--trainer.fast_dev_run=true",
          "--trainer.enable_progress_bar=false", "--model.init_args.model.init_args.depth=8"])


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as err:
        main(["frobnicate"])
    assert err.value.code == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_the_commands(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    assert "fit|validate|test" in out and "pretrain" in out and "plan" in out


def test_plan_prints_fold_and_swap_plans_with_a_targeting_file(tmp_path, monkeypatch, capsys):
    import amct_torch.zoo as zoo

    monkeypatch.setattr(zoo, "pretrained", lambda name: zoo.resnet_digits(depth=8).eval())
    targeting = tmp_path / "t.yaml"
    targeting.write_text("global: {weight_bits: 8}\nmodule_name:\n  fc: null\n  'layer1.*': {weight_bits: 4}\n")
    main(["plan", "resnet_digits", "--targeting", str(targeting)])
    out = capsys.readouterr().out
    assert "fold batch-norm" in out and "into conv1" in out
    fc_line = next(line for line in out.splitlines() if line.startswith("fc "))
    assert "skip" in fc_line and "module_name['fc']" in fc_line
    l1_line = next(line for line in out.splitlines() if line.startswith("layer1.0.conv1 "))
    assert "W4" in l1_line and "module_name['layer1.*']" in l1_line


def test_plan_rejects_a_bad_targeting_key(tmp_path, monkeypatch):
    import amct_torch.zoo as zoo
    from amct_torch.config import ConfigError

    monkeypatch.setattr(zoo, "pretrained", lambda name: zoo.resnet_digits(depth=8).eval())
    targeting = tmp_path / "t.yaml"
    targeting.write_text("global: {weight_bitz: 8}\n")
    with pytest.raises(ConfigError, match="weight_bitz"):
        main(["plan", "resnet_digits", "--targeting", str(targeting)])
