import pytest
import torch

from amct_torch.zoo import CharVocab, ShakespeareDataModule, shakespeare_texts


@pytest.fixture(scope="module")
def dm():
    d = ShakespeareDataModule(block_size=64, batch_size=8)
    d.setup()
    return d


def test_editions_hold_the_packaged_texts():
    modern, folio, every = shakespeare_texts("modern"), shakespeare_texts("folio"), shakespeare_texts("all")
    assert len(modern) == 42 and len(folio) == 35 and len(every) == 77
    assert "hamlet_gut" in modern and modern["hamlet_gut"].startswith("HAMLET")


def test_bad_edition_is_rejected_with_allowed_values():
    with pytest.raises(ValueError, match="edition: got 'quarto'; allowed: one of modern, folio, all"):
        ShakespeareDataModule(edition="quarto")


def test_split_proportions_are_90_5_5(dm):
    n = {k: len(v) for k, v in dm.splits.items()}
    total = sum(n.values())
    assert abs(n["train"] / total - 0.90) < 0.005
    assert abs(n["val"] / total - 0.05) < 0.005 and abs(n["test"] / total - 0.05) < 0.005


def test_windows_target_is_input_shifted_by_one(dm):
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 64) and y.shape == (8, 64)
    ds = dm.train_dataloader().dataset
    a, b = ds[5]
    assert torch.equal(a[1:], b[:-1])


def test_vocab_round_trips_text_and_rejects_unknown_characters(dm):
    text = "To be, or not to be: that is the question.\n"
    assert dm.vocab.decode(dm.vocab.encode(text)) == text
    assert dm.vocab_size == len(dm.vocab) < 100
    with pytest.raises(ValueError, match="not in the vocabulary"):
        CharVocab("abc").encode("abz")


def test_eval_windows_are_capped_and_fixed():
    d = ShakespeareDataModule(block_size=64, batch_size=8, max_eval_windows=20)
    assert len(d.val_dataloader().dataset) == 20
    first = [x for x, _ in d.test_dataloader()]
    second = [x for x, _ in d.test_dataloader()]
    assert all(torch.equal(p, q) for p, q in zip(first, second))
