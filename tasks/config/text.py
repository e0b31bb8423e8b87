"""The char-LM flow's config: corpus and batching, the model, training with its time budget, samples."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rnn_models import PRECISIONS
from tasks import CORPORA, file_name
from tasks.config.base import (
    ConfigError,
    ModelOptions,
    RegistryOptions,
    TrainingOptions,
    check_common,
    option,
    override,
)

BUNDLED_CORPUS = CORPORA / "timemachine.txt"


@dataclass
class CorpusOptions:
    title = "corpus and batching"  # which text, and how it is cleaned and split
    data: str = option("", "UTF-8 text file, a path or an fsspec URL; default: H. G. Wells' The Time Machine in data/")
    sha256: str = option("", "expected sha256 of the corpus file; the run stops if it differs")
    lower: bool = option(True, "lower-case the corpus (and prompts)")
    letters_only: bool = option(False, "d2l-style clean-up: every run of non-letters becomes one space")
    val_fraction: float = option(0.1, "last part of the corpus held out for validation")
    sampling: str = option("sequential", "sequential carries the state across batches (truncated BPTT); "
                           "random draws independent windows", ("sequential", "random"))
    num_steps: int = option(64, "characters per training sequence (BPTT length)")


@dataclass
class CharModelOptions(ModelOptions):
    """The char LM's model: the recipe docs/BENCHMARKS.md measured, characters embedded."""
    hidden_size: int = override(ModelOptions, "hidden_size", 512, "hidden units per layer")
    num_layers: int = override(ModelOptions, "num_layers", 2)
    dropout: float = override(ModelOptions, "dropout", 0.3,
                              "dropout between stacked layers and on the last layer's output")
    input: str = option("embedding", "how characters enter the network", ("embedding", "onehot"))
    embedding_dim: int = option(64, "embedding width (with --input embedding)")
    input_dropout: float = option(0.1, "dropout on the embedded characters, before the first layer")


@dataclass
class CharTraining(TrainingOptions):
    """The char LM's training defaults, and the time budget."""
    epochs: int = override(TrainingOptions, "epochs", 10)
    batch_size: int = override(TrainingOptions, "batch_size", 32, "sequences per gradient step")
    lr: float = override(TrainingOptions, "lr", 4e-3, "AdamW learning rate at the top of its cosine")
    weight_decay: float = override(TrainingOptions, "weight_decay", 0.1)
    warmup: int = option(100, "optimizer steps over which the learning rate rises linearly to --lr (0 = none)")
    patience: int = override(TrainingOptions, "patience", 3)
    minutes: float = option(0.0, "train until this many minutes have passed, whatever --epochs says, the learning "
                            "rate falling on a cosine over them (0 = train by --epochs, the cosine over the epochs)")
    precision: str = option("auto", "the training step's arithmetic: auto = bf16 on CUDA and on CPUs that compute it "
                            "natively (AVX512-BF16, AMX; about 1.7x faster there), float32 on others; validation and "
                            "the registered model run in float32 on CPU", PRECISIONS)


@dataclass
class SampleOptions:
    title = "samples"  # shown while the model trains, and logged with it
    prefixes: str = option("time traveller,the time machine", "comma-separated prompts sampled during training")
    sample_every: int = option(5, "epochs between samples (0 = only at the end)")
    sample_chars: int = option(120, "characters generated per sample")
    temperature: float = option(0.8, "sampling temperature for the samples (0 = greedy)")
    top_k: int = option(0, "sample from the k most likely characters only (0 = all)")


@dataclass
class CharLMFlowConfig(RegistryOptions, SampleOptions, CharTraining, CharModelOptions, CorpusOptions):
    """The char-LM flow's config; its fields read corpus, model, training, samples, registry."""
    experiment: str = override(RegistryOptions, "experiment", "charlm-training")

    def __post_init__(self):
        check_common(self, positive=("batch_size", "num_steps", "embedding_dim", "sample_chars"),
                     non_negative=("sample_every", "top_k", "warmup", "temperature", "minutes"),
                     fractions=("val_fraction",), probabilities=("input_dropout",))
        if self.precision == "bf16":
            check_bf16(self.device)
        if not self.prompts:
            raise ConfigError("--prefixes holds no prompt; give at least one non-empty prefix")

    @property
    def prompts(self) -> list[str]:
        return [p for p in self.prefixes.split(",") if p.strip()]

    @property
    def corpus(self) -> str:
        return self.data or str(BUNDLED_CORPUS)

    @property
    def registered_name(self) -> str:
        return self.model_name or f"{Path(file_name(self.corpus)).stem or 'corpus'}-charlm"


def check_bf16(device: str) -> None:
    """Refuse --precision bf16 on a CPU without bf16 arithmetic: PyTorch's LSTM cannot run there in bf16
    (oneDNN finds no kernel), and training would stop with its error deep in the first step."""
    from rnn_models.training import native_bf16_cpu, resolve_device  # imports torch: only when bf16 is asked for

    if resolve_device(device) == "cpu" and not native_bf16_cpu():
        raise ConfigError("--precision bf16: this CPU has no bf16 arithmetic (AVX512-BF16 or AMX), where PyTorch's "
                          "LSTM cannot run in bf16; use --precision auto (float32 here) or a CUDA device")
