"""The digits image task: scikit-learn's 1,797 handwritten 8x8 digits, shipped inside the package.

A fixed, stratified split (seed 0): 1,257 train / 270 validation / 270 test images. Pixels (0..16) are
scaled to [0, 1], optionally resized (bilinear) to ``image_size`` and normalised with the training
mean and standard deviation. Training augmentation (off by default): small random rotations, shifts
and scaling.
"""

from __future__ import annotations

from dataclasses import dataclass

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

__all__ = ["DigitsDataModule", "load_digits_split", "DigitsSplit"]

SPLIT_SEED = 0
N_VAL = 270
N_TEST = 270


@dataclass(frozen=True)
class DigitsSplit:
    """Tensors of the fixed split: images ``(N, 1, S, S)`` float32 normalised, labels ``(N,)`` int64."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    mean: float
    std: float


def load_digits_split(image_size: int = 8) -> DigitsSplit:
    """Load, split (stratified, seed 0), resize and normalise the digits. Deterministic."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not isinstance(image_size, int) or image_size < 8:
        raise ValueError(f"image_size: got {image_size!r}; allowed: an int >= 8 (the images are 8x8)")
    data = load_digits()
    x = data.images.astype(np.float32) / 16.0
    y = data.target.astype(np.int64)
    idx = np.arange(len(y))
    idx_trval, idx_test = train_test_split(idx, test_size=N_TEST, stratify=y, random_state=SPLIT_SEED)
    idx_train, idx_val = train_test_split(idx_trval, test_size=N_VAL, stratify=y[idx_trval], random_state=SPLIT_SEED)

    def prep(ids: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        xs = torch.from_numpy(x[np.sort(ids)]).unsqueeze(1)
        if image_size != 8:
            xs = F.interpolate(xs, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return xs, torch.from_numpy(y[np.sort(ids)])

    train, val, test = prep(idx_train), prep(idx_val), prep(idx_test)
    mean, std = train[0].mean().item(), train[0].std().item()
    norm = lambda t: ((t[0] - mean) / std, t[1])  # noqa: E731
    return DigitsSplit(norm(train), norm(val), norm(test), mean, std)


class _Augmented(Dataset):
    """Random affine jitter of each training image (rotation, shift, scale), seeded by the DataLoader."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, fill: float):
        from torchvision.transforms import v2

        self.images, self.labels = images, labels
        self.transform = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), fill=fill)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


class DigitsDataModule(L.LightningDataModule):
    """Digits as a LightningDataModule.

    Args:
        image_size: side of the square images (8 = native; 16 or 32 upsample).
        batch_size: training batch size (evaluation uses the same).
        augment: random affine jitter on training images.
        num_workers: DataLoader workers (0 keeps everything in this process).

    Example::

        dm = DigitsDataModule(image_size=16); dm.setup()
        x, y = next(iter(dm.train_dataloader()))     # (64, 1, 16, 16), (64,)
    """

    num_classes = 10

    def __init__(self, image_size: int = 16, batch_size: int = 64, augment: bool = False, num_workers: int = 0):
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: got {batch_size!r}; allowed: a positive int")
        self.save_hyperparameters()
        self.image_size, self.batch_size, self.augment, self.num_workers = image_size, batch_size, augment, num_workers
        self.split: DigitsSplit | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def setup(self, stage: str | None = None) -> None:
        if self.split is None:
            self.split = load_digits_split(self.image_size)

    def _loader(self, ds: Dataset, shuffle: bool) -> DataLoader:
        return DataLoader(ds, batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        x, y = self.split.train
        ds = _Augmented(x, y, fill=-self.split.mean / self.split.std) if self.augment else TensorDataset(x, y)
        return self._loader(ds, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(TensorDataset(*self.split.val), shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(TensorDataset(*self.split.test), shuffle=False)

    def calibration_batches(self, n: int = 4) -> list[torch.Tensor]:
        """The first ``n`` training batches (inputs only, no augmentation, fixed order) for calibration."""
        self.setup()
        x = self.split.train[0]
        return [x[i * self.batch_size:(i + 1) * self.batch_size] for i in range(n) if i * self.batch_size < len(x)]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        self.setup()
        return self.split.val[0][:batch]
