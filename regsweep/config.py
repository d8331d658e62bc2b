"""One frozen description of a training run.

The CLI, the MLproject entry point and the sweep all build a `TrainConfig`; everything below receives it.
`validate()` is called before any MLflow run exists, so bad input never leaves an empty run behind.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

MODELS = ("cnn", "mlp")
NORMS = ("bn", "gbn", "none")
OPTIMIZERS = ("sgd", "adam")
SCHEDULERS = ("none", "step", "onecycle")
ACTIVATIONS = ("relu", "tanh", "sigmoid")
INITS = ("default", "gaussian", "glorot")
PRECISIONS = ("fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
PENALIZE = ("weights", "all")
# The settings that take one of a few names: validate checks them, and the CLI offers them as click choices.
CHOICES = {"model": MODELS, "norm": NORMS, "optimizer": OPTIMIZERS, "scheduler": SCHEDULERS,
           "activation": ACTIVATIONS, "init": INITS, "precision": PRECISIONS, "penalize": PENALIZE, "device": DEVICES}
SAMPLERS = ("tpe", "random", "grid")  # for regsweep optimize
PRUNERS = ("median", "hyperband", "none")
REPORT_FORMATS = ("table", "markdown", "csv", "json")  # what regsweep report prints
# Settings that apply only where another one says so (the MLP's layers, ghost batch norm's virtual batch, the
# step schedule's period, SGD's momentum): elsewhere they change nothing, so they are logged as NOT_APPLICABLE
# (a CNN run showing hidden=500,250,100 in the MLflow UI reads as if it had layers), and the report does not
# let them split a configuration in two (runs logged through `mlflow run` carry every value as typed).
APPLIES_WHERE = {"hidden": ("model", "mlp"), "activation": ("model", "mlp"), "init": ("model", "mlp"),
                 "ghost_batch_size": ("norm", "gbn"), "step_size": ("scheduler", "step"),
                 "momentum": ("optimizer", "sgd")}
NOT_APPLICABLE = "n/a"
FLOAT32_MAX = 3.4028234663852886e38
# 4 GB of float32 weights, 12 GB with gradients and momentum: trainable on a 24 GB machine or a GPU, while the
# MLP this was set for (two layers of 65,536 units: 4.3 billion weights) only failed to allocate.
MAX_MLP_WEIGHTS = 1_000_000_000


class ConfigError(ValueError):
    """A configuration that cannot be trained; the message names the field and what is allowed."""


def default_data_dir() -> str:
    """The repository's vendored `data/` when running from a checkout, else `./data`."""
    repo_data = Path(__file__).resolve().parent.parent / "data"
    return str(repo_data if (repo_data / "mnist").is_dir() else Path("data"))


@dataclass(frozen=True)
class TrainConfig:
    # --- regularisation: explicit penalties added to the loss (see regularization.py) ---
    l1: float = 0.0  # coefficient of sum|w| over penalised tensors
    l2: float = 0.0  # coefficient of sum w^2 over penalised tensors (not decoupled weight decay)
    penalize: str = "weights"  # "weights": conv/linear weights only; "all": also biases and norm affine params

    # --- model ---
    model: str = "cnn"
    norm: str = "bn"  # bn | gbn (ghost batch norm) | none
    ghost_batch_size: int = 32  # virtual batch size of ghost batch norm; only used with norm=gbn
    dropout: float = 0.0  # after each CNN block / MLP hidden layer; off so L1/L2 are the regularisers under study
    hidden: str = "500,250,100"  # MLP hidden sizes, comma-separated (the notebooks also used 20,7,5)
    activation: str = "relu"  # MLP activation
    init: str = "default"  # MLP weight init: PyTorch's default, gaussian N(0, 0.01²) (std 0.01), or glorot uniform

    # --- optimisation ---
    epochs: int = 15
    batch_size: int = 128
    lr: float = 0.1  # peak learning rate for onecycle, initial for step/none
    momentum: float = 0.9  # SGD only: Nesterov momentum, 0 = plain SGD
    optimizer: str = "sgd"
    scheduler: str = "onecycle"
    step_size: int = 6  # epochs between x0.1 decays with scheduler=step
    patience: int = 0  # early stopping on validation loss after this many epochs without improvement; 0 = off
    augment: bool = True  # random rotation of up to `rotate` degrees, applied to whole batches
    rotate: float = 7.0  # degrees; the notebooks' RandomRotation(7)
    precision: str = "fp32"  # bf16 = autocast to bfloat16 for the forward pass
    compile: bool = True  # torch.compile the model: faster CPU steps after a one-off compilation
    device: str = "auto"  # auto = CUDA when available, else CPU
    cuda_graph: bool = True  # on CUDA, replay the whole training step as one captured graph (step.py)
    deterministic: bool = True  # on CUDA, deterministic cuDNN algorithms: same seed, same result (step.py)
    tf32: bool = True  # on CUDA, cuDNN convolutions in TF32 (PyTorch's default; step.py says why)

    # --- data ---
    seed: int = 1  # model init, batch order and augmentation; the validation split does not depend on it
    val_size: int = 5000  # held out from the 60k training images for model selection
    max_train_samples: int = 0  # 0 = all remaining training images; small values for quick runs
    max_eval_samples: int = 0  # 0 = full validation and test sets; small values for quick runs
    data_dir: str = ""  # empty = the repository's vendored data/
    download: bool = False  # let torchvision download MNIST when data_dir lacks it

    # --- outputs ---
    log_model: bool = True  # mlflow.pytorch.log_model of the best-validation weights
    log_images: bool = True  # misclassified grid, confusion matrix, histograms, curves
    threads: int = 0  # torch intra-op threads; 0 = leave PyTorch's default

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def resolved_data_dir(self) -> str:
        """The data folder as an absolute path. The CLI stores it in the config, so that every process of a
        sweep (and every logged param) names the same folder whatever its working directory."""
        return str(Path(self.data_dir or default_data_dir()).resolve())

    def resolved_device(self) -> str:
        """'cuda' or 'cpu': what `device` means on this machine."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def hidden_sizes(self) -> tuple[int, ...]:
        return tuple(int(h) for h in self.hidden.split(",") if h.strip())

    @property
    def regime(self) -> str:
        """none | l1 | l2 | l1+l2: the four scenarios the comparison is about."""
        parts = [name for name, value in (("l1", self.l1), ("l2", self.l2)) if value > 0]
        return "+".join(parts) or "none"

    @property
    def run_name(self) -> str:
        """Short, for the MLflow runs table, e.g. `cnn l1=1e-3 l2=0 s1` (to sort by a coefficient: the l1 and l2
        metrics, tracking.coefficient_metrics)."""
        return f"{self.model} l1={fmt_coef(self.l1)} l2={fmt_coef(self.l2)} s{self.seed}"

    def as_params(self) -> dict[str, str]:
        params = dataclasses.asdict(self)
        params["data_dir"] = self.resolved_data_dir()
        params["device"] = self.resolved_device()
        for name, (key, value) in APPLIES_WHERE.items():
            if params[key] != value:
                params[name] = NOT_APPLICABLE
        return {k: str(v) for k, v in params.items()}

    def validate(self) -> TrainConfig:
        """Raise ConfigError on the first problem; return self so calls chain."""
        for name in ("l1", "l2", "lr", "dropout", "momentum", "rotate"):
            value = getattr(self, name)
            low = "> 0" if name == "lr" else ">= 0"  # a learning rate of 0 trains nothing
            if not isinstance(value, (int, float)) or math.isnan(value) or math.isinf(value) or value < 0 or (
                    name == "lr" and value == 0):
                raise ConfigError(f"{name} must be a finite number {low}, got {value!r}")
        if self.lr > FLOAT32_MAX:  # the optimizer holds it as a float32 on the device: larger only overflows there
            raise ConfigError(f"lr must be at most {FLOAT32_MAX:.4g} (float32), got {self.lr!r}")
        if self.rotate > 360:  # +-360 degrees already covers every angle twice; far larger ones overflow to NaN
            raise ConfigError(f"rotate must be at most 360 degrees, got {self.rotate!r}")
        if self.dropout >= 1:
            raise ConfigError(f"dropout must be < 1, got {self.dropout}")
        if self.momentum >= 1:
            raise ConfigError(f"momentum must be < 1, got {self.momentum}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"unknown {name} {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        for name, low in (("epochs", 1), ("batch_size", 1), ("ghost_batch_size", 1), ("step_size", 1),
                          ("patience", 0), ("val_size", 1), ("max_train_samples", 0), ("seed", 0),
                          ("max_eval_samples", 0), ("threads", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.device == "cuda":
            import torch

            if not torch.cuda.is_available():
                raise ConfigError(f"device cuda: no CUDA device is available (torch {torch.__version__}); "
                                  "use --device cpu or auto")
        if self.val_size >= 60000:
            raise ConfigError(f"val_size must leave training images, got {self.val_size}")
        try:
            sizes = self.hidden_sizes()
        except ValueError:
            raise ConfigError(f"hidden must be comma-separated integers, got {self.hidden!r}") from None
        if self.model == "mlp" and (not sizes or min(sizes) < 1):
            raise ConfigError(f"hidden must list positive layer sizes, got {self.hidden!r}")
        if self.seed >= 2**63:  # torch takes seeds below 2**64; seed + 1, seed + repeat must fit
            raise ConfigError(f"seed must be below 2**63, got {self.seed}")
        if self.threads > 4096:  # torch.set_num_threads takes a C int, and no machine has more cores than this
            raise ConfigError(f"threads must be at most 4096, got {self.threads}")
        # Too large an MLP only fails to allocate, after its run began (or meets the out-of-memory killer).
        if self.model == "mlp" and max(sizes) > 65536:
            raise ConfigError(f"hidden layers must have at most 65,536 units, got {self.hidden!r}")
        widths = [28 * 28, *sizes, 10]
        weights = sum(a * b for a, b in zip(widths, widths[1:]))
        if self.model == "mlp" and weights > MAX_MLP_WEIGHTS:
            raise ConfigError(f"the MLP {self.hidden!r} would have {weights:,} weights; at most {MAX_MLP_WEIGHTS:,} "
                              "(the notebooks' largest has 0.5 million)")
        # Ghost batch norm splits each batch into equal virtual batches (a last chunk of one sample would stop
        # the MLP's batch norm in its first step). A batch is smaller than batch_size when the training split is.
        n_train = min(60000 - self.val_size, self.max_train_samples or 60000)
        batch = min(self.batch_size, n_train)
        if self.norm == "gbn" and batch % self.ghost_batch_size:
            which = f"batch_size ({self.batch_size})" if batch == self.batch_size else \
                f"the batch ({batch}: the training split is smaller than batch_size)"
            raise ConfigError(f"{which} must be a multiple of ghost_batch_size ({self.ghost_batch_size})")
        # The MLP's batch norm normalises each feature over the batch (or ghost chunk): one sample has no spread.
        # (The CNN's also normalises over the pixels of a map, so one image is enough there.)
        chunk = self.ghost_batch_size if self.norm == "gbn" else batch
        if self.model == "mlp" and self.norm != "none" and chunk == 1:
            which = "ghost_batch_size" if self.norm == "gbn" else "the batch"
            raise ConfigError(f"the MLP's batch norm needs at least 2 samples to a batch; {which} is 1 "
                              "(use --norm none, or more images to a batch)")
        return self


def fmt_coef(value: float, digits: int = 3) -> str:
    """0 -> '0', 0.001 -> '1e-3', 0.00025 -> '2.5e-4': short run names, to `digits` significant digits."""
    if value == 0:
        return "0"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
