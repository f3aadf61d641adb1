import pytest
import torch

from amct_torch.zoo import DigitsDataModule, load_digits_split


@pytest.fixture(scope="module")
def split16():
    return load_digits_split(16)


def test_split_sizes_are_fixed_and_cover_the_dataset(split16):
    sizes = [len(split16.train[1]), len(split16.val[1]), len(split16.test[1])]
    assert sizes == [1257, 270, 270]
    assert sum(sizes) == 1797


def test_split_is_stratified_every_class_in_every_split(split16):
    for _, y in (split16.train, split16.val, split16.test):
        counts = torch.bincount(y, minlength=10)
        assert counts.min() >= 0.08 * len(y), counts


def test_split_is_deterministic():
    a, b = load_digits_split(8), load_digits_split(8)
    assert torch.equal(a.train[0], b.train[0]) and torch.equal(a.test[1], b.test[1])


def test_resize_gives_requested_shape_and_training_images_are_normalised(split16):
    assert split16.train[0].shape == (1257, 1, 16, 16)
    assert abs(split16.train[0].mean().item()) < 1e-4
    assert abs(split16.train[0].std().item() - 1) < 1e-3


def test_native_size_keeps_8x8():
    assert load_digits_split(8).val[0].shape == (270, 1, 8, 8)


def test_bad_image_size_names_the_key():
    with pytest.raises(ValueError, match="image_size: got 4"):
        load_digits_split(4)


def test_datamodule_batches_and_augmentation_keep_shapes_but_change_pixels():
    torch.manual_seed(0)
    plain = DigitsDataModule(image_size=16, batch_size=32)
    aug = DigitsDataModule(image_size=16, batch_size=32, augment=True)
    x, y = next(iter(plain.train_dataloader()))
    assert x.shape == (32, 1, 16, 16) and y.shape == (32,) and y.dtype == torch.int64
    ds_plain, ds_aug = plain.train_dataloader().dataset, aug.train_dataloader().dataset
    xa, ya = ds_aug[0]
    xp, yp = ds_plain[0]
    assert xa.shape == xp.shape and ya == yp
    assert not torch.equal(xa, xp)
    assert len(plain.val_dataloader().dataset) == 270 and len(plain.test_dataloader().dataset) == 270


def test_calibration_batches_are_fixed_training_inputs():
    dm = DigitsDataModule(batch_size=16)
    a, b = dm.calibration_batches(3), dm.calibration_batches(3)
    assert len(a) == 3 and all(t.shape == (16, 1, 16, 16) for t in a)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
