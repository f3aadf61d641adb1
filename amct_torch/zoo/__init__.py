"""Reference tasks on data that ships inside packages, reference models, and their pretraining.

Shared by the demo, recipes, notebooks, tests and benchmarks. Importing this package imports Lightning;
nothing in the compression core imports it.
"""

from .digits import DigitsDataModule, load_digits_split
from .models import MobileNetV2Digits, ResNetDigits, build_model, gpt_shakespeare, mobilenetv2_digits, resnet_digits
from .reference import REFERENCE_MODELS, cache_dir, cached_info, pretrain, pretrained, reference_datamodule, reference_task
from .shakespeare import CharVocab, ShakespeareDataModule, shakespeare_texts
from .tasks import CausalLM, ImageClassifier, evaluate_accuracy, evaluate_perplexity

__all__ = ["DigitsDataModule", "load_digits_split", "MobileNetV2Digits", "ResNetDigits", "build_model", "gpt_shakespeare",
           "mobilenetv2_digits", "resnet_digits", "REFERENCE_MODELS", "cache_dir", "cached_info", "pretrain", "pretrained",
           "reference_datamodule", "reference_task", "CharVocab", "ShakespeareDataModule", "shakespeare_texts",
           "CausalLM", "ImageClassifier", "evaluate_accuracy", "evaluate_perplexity"]
