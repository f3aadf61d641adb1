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
