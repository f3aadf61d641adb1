import math

import lightning as L
import torch

from amct_torch.zoo import (CausalLM, DigitsDataModule, ImageClassifier, ShakespeareDataModule, evaluate_accuracy,
                            evaluate_perplexity, gpt_shakespeare, resnet_digits)


def _trainer():
    return L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                     enable_model_summary=False)


def test_image_classifier_trains_and_tests_on_digits():
    torch.manual_seed(0)
    task = ImageClassifier(resnet_digits(depth=8))
    before = task.model.fc.weight.detach().clone()
    trainer = _trainer()
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=16))
    assert not torch.equal(before, task.model.fc.weight)
    metrics = trainer.test(task, datamodule=DigitsDataModule(batch_size=16), verbose=False)[0]
    assert 0.0 <= metrics["test_acc"] <= 1.0


def test_causal_lm_reports_perplexity_equal_to_exp_loss():
    torch.manual_seed(0)
    dm = ShakespeareDataModule(block_size=32, batch_size=4, max_eval_windows=8)
    dm.setup()
    task = CausalLM(gpt_shakespeare(dm.vocab_size, block_size=32, n_layer=1, n_embd=32, n_head=2))
    trainer = _trainer()
    trainer.fit(task, datamodule=dm)
    m = trainer.test(task, datamodule=dm, verbose=False)[0]
    assert math.isclose(m["test_ppl"], math.exp(m["test_loss"]), rel_tol=1e-5)
    assert math.isclose(evaluate_perplexity(task.model, dm.test_dataloader()), m["test_ppl"], rel_tol=1e-4)


def test_evaluate_accuracy_counts_correct_predictions_and_restores_mode():
    class Oracle(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.one_hot(x[:, 0].long(), 10).float()

    m = Oracle().train()
    loader = [(torch.tensor([[1.0], [2.0], [3.0]]), torch.tensor([1, 2, 0]))]
    assert evaluate_accuracy(m, loader) == 2 / 3
    assert m.training
