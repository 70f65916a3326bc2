"""What a benchmark suite runs: one :class:`RunSpec` per model × method × setting.

``quick`` (under 10 minutes on 2 cores) keeps the paper-scale models at 96² and compares the baselines with
hosvd ε = 0.8 only; ``full`` runs the issue's grid at 224² (see ``docs/bench.md`` for its run time).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Literal, NamedTuple

Method = Literal["recipe", "none", "svd", "hosvd", "asi"]
METHODS: tuple[Method, ...] = ("recipe", "none", "svd", "hosvd", "asi")
EPS_RULES = ("energy", "centred")  # converter.compression.ranks.EpsRule (bench.suite imports no TensorFlow)
PAPER_MODELS = ("mobilenetv2", "resnet18")
DATA_MODELS = {"digits": "digits_cnn", "basicmotions": "imu_cnn", "japanesevowels": "vowels_cnn",
               "plaid": "plaid_cnn"}
# the quick suite's real data (its documented run time); full and accuracy add the harder sets
QUICK_DATASETS = ("digits", "basicmotions")


@dataclass(frozen=True)
class RunSpec:
    """One benchmark run.

    Attributes:
        model: ``mobilenetv2``, ``resnet18`` (random init, calibrated BatchNorm) or a value of
            :data:`DATA_MODELS` (pre-trained on the real data set ``dataset``).
        train_last: the converter's ``train_last`` (weighted layers counted from the end, the head included).
        method: ``recipe`` (no compression, whole batch through ``train``) or a compression method run with
            prefix streaming (``none``, ``svd``, ``hosvd``, ``asi``).
        epsilon: ε for ``svd``/``hosvd`` (``None`` otherwise).
        eps_rule: the converter's ``eps_rule`` for ``svd``/``hosvd``: ``energy`` (the paper's) or ``centred``.
        asi_budget: for ``asi``: the saved-activation budget as a fraction of the vanilla saved bytes.
        batch_size: the static train batch.
        micro_batch: samples per ``features`` invoke in the streamed plan.
        input_size: square input side for the paper-scale models (``None``: the data set's shape).
        dataset: a key of :data:`DATA_MODELS` for accuracy runs, else ``None``.
        seed: seeds the data split, pre-training, the model and the fine-tuning batches.
        warmup: steps before timing; for accuracy runs ``warmup + timed`` is the fine-tuning length.
        timed: timed steps (the median is reported).
        cached_steps: timed ``train_features`` steps on cached prefix features (streamed plans).
        optimizer: ``sgd`` or ``adam``.
        learning_rate: the optimizer's step size.
        subspace_iters: the converter's subspace-iteration steps per mode (``svd``/``hosvd``).
    """

    model: str
    train_last: int
    method: Method
    epsilon: float | None = None
    eps_rule: str = "energy"
    asi_budget: float | None = None
    batch_size: int = 32
    micro_batch: int = 1
    input_size: int | None = None
    dataset: str | None = None
    seed: int = 0
    warmup: int = 1
    timed: int = 3
    cached_steps: int = 5
    optimizer: str = "sgd"
    learning_rate: float = 0.01
    subspace_iters: int = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {list(METHODS)}")
        if (self.epsilon is None) == (self.method in ("svd", "hosvd")):
            raise ValueError(f"{self.method} takes epsilon only for svd/hosvd, got epsilon={self.epsilon}")
        if (self.asi_budget is None) == (self.method == "asi"):
            raise ValueError(f"asi needs asi_budget (and only asi takes one), got {self.asi_budget}")
        if self.eps_rule not in EPS_RULES or (self.eps_rule != "energy" and self.epsilon is None):
            raise ValueError(f"eps_rule must be one of {list(EPS_RULES)} ({self.eps_rule!r} given), and other than "
                             f"energy only with an epsilon")

    @property
    def compression(self) -> str:
        """The converter's ``compression``: ``recipe`` runs the ``none`` bundle."""
        return "none" if self.method == "recipe" else self.method

    @property
    def conversion_key(self) -> tuple:
        """Runs with equal keys share one bundle (``recipe`` and ``none`` do)."""
        fields = asdict(self)
        for name in ("method", "micro_batch", "warmup", "timed", "cached_steps"):
            fields.pop(name)
        return (self.compression, *sorted(fields.items()))


class Setting(NamedTuple):
    """One method of a suite's grid, with its options (the :class:`RunSpec` fields of the same names)."""

    method: Method
    epsilon: float | None = None
    asi_budget: float | None = None
    eps_rule: str = "energy"


BASELINES = [Setting("recipe"), Setting("none")]
QUICK_METHODS = [*BASELINES, Setting("hosvd", 0.8)]
FULL_METHODS = [*BASELINES, Setting("svd", 0.8), Setting("svd", 0.9), Setting("hosvd", 0.7), Setting("hosvd", 0.8),
                Setting("hosvd", 0.9), Setting("asi", asi_budget=0.5), Setting("asi", asi_budget=0.25)]


def _grid(base: RunSpec, methods: list[Setting]) -> list[RunSpec]:
    return [replace(base, **m._asdict()) for m in methods]


def _data_runs(methods: list[Setting], seeds: tuple[int, ...], fast: bool,
               datasets: tuple[str, ...] = tuple(DATA_MODELS)) -> list[RunSpec]:
    """Every method on every data set and seed, seed by seed (a partial run has every data set)."""
    from demo.run import SETTINGS  # the demo's fine-tuning recipe per data set

    runs = []
    for seed in seeds:
        for dataset in datasets:
            s = SETTINGS[dataset]
            steps = s.fast_steps if fast else s.steps
            base = RunSpec(model=DATA_MODELS[dataset], train_last=s.train_last, method="none", dataset=dataset,
                           seed=seed, batch_size=s.batch_size, warmup=5, timed=steps - 5, optimizer=s.optimizer,
                           learning_rate=s.learning_rate, cached_steps=20)
            runs += _grid(base, methods)
    return runs


def quick() -> list[RunSpec]:
    """The ``--quick`` suite: real-data accuracy (2 seeds) and the paper-scale models at 96²."""
    runs = _data_runs(QUICK_METHODS, seeds=(0, 1), fast=True, datasets=QUICK_DATASETS)
    runs += _grid(RunSpec("mobilenetv2", train_last=5, method="none", input_size=96), QUICK_METHODS)
    runs += _grid(RunSpec("resnet18", train_last=3, method="none", input_size=96), QUICK_METHODS)
    return runs


def full() -> list[RunSpec]:
    """The full suite, most telling runs first (a partial run still answers the main questions).

    MobileNetV2 224² with 4 and 2 trainable convolutions (``train_last`` 5 and 3: the convolutions and the
    head), real-data accuracy over 3 seeds, then ResNet18-style 224² with its last stage (``train_last`` 6:
    4 convolutions, the strided shortcut and the head, so one tensor crosses from the frozen prefix) and its
    last block (``train_last`` 3); every method of the issue.
    """
    runs = _grid(RunSpec("mobilenetv2", train_last=5, method="none", input_size=224), FULL_METHODS)
    runs += _data_runs(FULL_METHODS, seeds=(0, 1, 2), fast=False)
    runs += _grid(RunSpec("resnet18", train_last=6, method="none", input_size=224), FULL_METHODS)
    runs += _grid(RunSpec("mobilenetv2", train_last=3, method="none", input_size=224), FULL_METHODS)
    runs += _grid(RunSpec("resnet18", train_last=3, method="none", input_size=224), FULL_METHODS)
    return runs


ACCURACY_METHODS = [*BASELINES, Setting("hosvd", 0.8), Setting("hosvd", 0.9), Setting("svd", 0.8),
                    Setting("asi", asi_budget=0.25)]
ACCURACY_DATASETS = ("digits", "japanesevowels", "plaid")


def accuracy() -> list[RunSpec]:
    """Learning quality (issue 11): digits, JapaneseVowels and PLAID, 3 seeds, each data set's fine-tuning
    recipe (``demo.run.SETTINGS``: 150 steps), ``recipe``/``none``, hosvd ε 0.8 and 0.9, svd ε 0.8 and asi at a
    quarter of the vanilla saved bytes; accuracy before/after and the peak RSS of every run."""
    return _data_runs(ACCURACY_METHODS, seeds=(0, 1, 2), fast=False, datasets=ACCURACY_DATASETS)


CENTRED_METHODS = [*BASELINES, Setting("hosvd", 0.8), Setting("hosvd", 0.8, eps_rule="centred")]


def accuracy_centred() -> list[RunSpec]:
    """The centred ε rule against the paper's (issue 11): the accuracy suite's data sets, seeds and recipes,
    ``recipe``/``none`` and hosvd ε 0.8 under both rules."""
    return _data_runs(CENTRED_METHODS, seeds=(0, 1, 2), fast=False, datasets=ACCURACY_DATASETS)


# stages 3 and 4 of bench.archs.resnet18_style: 2 blocks of 2 convolutions each, 1 shortcut convolution
RESNET18_LAST_TWO_STAGES = 2 * (2 * 2 + 1) + 1  # ... and the head
DEPTH_METHODS = [*BASELINES, Setting("hosvd", 0.8), Setting("asi", asi_budget=0.25)]


def depth() -> list[RunSpec]:
    """Where compression can show in the measured peak: MobileNetV2 224², batch 32, the last 14, 20 and 35
    weighted layers trainable (61, 121 and 228 MiB of vanilla conv inputs), and the ResNet18-style model's last
    two stages (10 convolutions and the head), for ``recipe`` (whole batch), and streamed ``none``, ``hosvd``
    ε 0.8 and ``asi`` at a quarter of the vanilla saved bytes (see ``docs/bench.md``: each 224² conversion at
    these depths takes minutes)."""
    bases = [RunSpec("mobilenetv2", train_last=n, method="none", input_size=224) for n in (14, 20, 35)]
    bases.append(RunSpec("resnet18", train_last=RESNET18_LAST_TWO_STAGES, method="none", input_size=224))
    return [run for base in bases for run in _grid(base, DEPTH_METHODS)]


def tiny() -> list[RunSpec]:
    """A seconds-long suite for the tests: digits, one seed, the baselines and hosvd, a few steps."""
    base = RunSpec(model="digits_cnn", train_last=2, method="none", dataset="digits", seed=0, batch_size=8,
                   warmup=1, timed=3, cached_steps=3)
    return _grid(base, QUICK_METHODS)


SUITES = {"quick": quick, "full": full, "accuracy": accuracy, "accuracy-centred": accuracy_centred, "depth": depth,
          "tiny": tiny}
