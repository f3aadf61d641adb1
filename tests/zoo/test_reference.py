import dataclasses

import pytest
import torch

from amct_torch.zoo import reference as pt


@pytest.fixture
def tiny_spec(monkeypatch, tmp_path):
    """A two-batch version of the resnet spec, trained into a temporary cache."""
    monkeypatch.setenv("AMCT_TORCH_CACHE", str(tmp_path))
    spec = dataclasses.replace(pt.REFERENCE_MODELS["resnet_digits"], model={"depth": 8},
                               trainer={"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
                                        "limit_test_batches": 1})
    monkeypatch.setitem(pt.REFERENCE_MODELS, "resnet_digits", spec)
    return spec


def test_pretraining_is_seeded_and_reproducible(tiny_spec):
    a, info_a = pt.pretrain("resnet_digits")
    b, info_b = pt.pretrain("resnet_digits")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert info_a["metrics"] == info_b["metrics"] and "test_acc" in info_a["metrics"]


def test_pretrained_caches_and_reloads_without_training(tiny_spec, tmp_path, monkeypatch):
    first = pt.pretrained("resnet_digits", verbose=False)
    assert (tmp_path / "resnet_digits.pt").is_file()
    monkeypatch.setattr(pt, "pretrain", lambda name: (_ for _ in ()).throw(AssertionError("retrained")))
    second = pt.pretrained("resnet_digits", verbose=False)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(first(x), second(x)) and not second.training


def test_changed_spec_invalidates_the_cache(tiny_spec, monkeypatch):
    pt.pretrained("resnet_digits", verbose=False)
    assert pt.cached_info("resnet_digits") is not None
    monkeypatch.setitem(pt.REFERENCE_MODELS, "resnet_digits", dataclasses.replace(tiny_spec, seed=1))
    assert pt.cached_info("resnet_digits") is None


def test_corrupt_cache_entry_is_ignored(tiny_spec, tmp_path):
    (tmp_path / "resnet_digits.pt").write_bytes(b"not a checkpoint")
    assert pt.cached_info("resnet_digits") is None


def test_unknown_reference_model_lists_the_known_ones():
    with pytest.raises(ValueError, match="allowed: one of resnet_digits, mobilenetv2_digits, gpt_shakespeare"):
        pt.pretrained("alexnet")
