"""The `s2d run` config as frozen, validated dataclasses (parsed from TOML by :mod:`s2d.pipeline.parse`)."""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field, replace

from s2d.quant import Bits, QuantConfig
from s2d.quant.api import method_config
from s2d.colinearity import CDConfig
from s2d.regularizer import S2DConfig
from s2d.train import ConditionConfig, TrainConfig

__all__ = ["ARM_KINDS", "SWEEP_KEYS", "SECTIONS", "DATA_FORMATS", "ModelConfig", "DataConfig", "ArmConfig",
           "QuantGridConfig", "ProbeConfig", "DeployConfig", "ExperimentConfig", "DEFAULT_PROMPT", "check_int", "check_str", "scale_interval"]

ARM_KINDS = ("adamw", "adamw+s2d", "adamw+s2d-rel", "adamw+condition", "adamw+cd", "muon", "muon+s2d",
             "adamw+s2d-all", "qat", "qat+s2d")
# adamw+s2d-rel: S2D with the relative update (S2DConfig.update="relative"), guarded by s2d.guard_examples;
# adamw+condition: the adamw arm of the same seed, then conditioned without labels ([condition], `s2d condition`);
# adamw+cd: Colinearity Decay ([cd], s2d.colinearity) on the block layout's (value -> output, up -> down) pairs
SWEEP_KEYS = ("strength", "interval", "k_max", "tau", "power", "update")
SECTIONS = ("name", "seed", "seeds", "model", "data", "train", "s2d", "cd", "arms", "sweep", "condition", "quant",
            "probes", "deploy", "quick")
DATA_FORMATS = ("csv", "jsonl", "imagefolder", "npz")
DEFAULT_PROMPT = "Text: {text}\nLabel:"   # the causal-LM prompt when data.prompt is not set


def check_str(name: str, value: object) -> None:
    """ValueError naming ``name`` unless ``value`` is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def check_int(name: str, value: object, low: int) -> None:
    """ValueError naming ``name`` unless ``value`` is None or an integer >= ``low``."""
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """Which pretrained model to fine-tune."""
    name: str                          # an s2d asset name, a local Hugging Face directory, or a hub id
    image_size: int | None = None      # input resolution in pixels (image models; None: the model's own)

    def __post_init__(self) -> None:
        check_str("model.name", self.name)
        check_int("model.image_size", self.image_size, 1)


@dataclass(frozen=True)
class DataConfig:
    """The dataset and how much of it is used."""
    dataset: str                       # asset name or path (CSV/JSONL, image folder, .npz)
    format: str | None = None          # one of DATA_FORMATS (None: from the path)
    text_column: str = "text"          # CSV/JSONL text column
    label_column: str = "label"        # CSV/JSONL label column
    max_length: int = 128              # tokens per text example
    image_size: int | None = None      # image resize in pixels (None: the model's)
    limit_train: int | None = None     # stratified subset of the train split, examples (None: all)
    limit_eval: int | None = None      # the same for the val and test splits
    calib_samples: int = 32            # training examples used to calibrate PTQ / QAT
    subset_seed: int = 0               # seed of the limit_* subsets: one test set for every training seed
    prompt: str | None = None          # causal LMs: the template with one {text} (None: DEFAULT_PROMPT)
    label_words: tuple[str, ...] | None = None  # causal LMs: one single-token answer word per class
    #                                    (None: the dataset's label names)

    def __post_init__(self) -> None:
        check_str("data.dataset", self.dataset)
        for key in ("max_length", "image_size", "limit_train", "limit_eval", "calib_samples"):
            check_int(f"data.{key}", getattr(self, key), 1)
        check_int("data.subset_seed", self.subset_seed, 0)
        if self.format not in (None, *DATA_FORMATS):
            raise ValueError(f"data.format must be one of {', '.join(DATA_FORMATS)}, got {self.format!r}")
        check_str("data.text_column", self.text_column)
        check_str("data.label_column", self.label_column)
        if self.prompt is not None and (not isinstance(self.prompt, str) or self.prompt.count("{text}") != 1):
            raise ValueError(f"data.prompt must be a string with '{{text}}' exactly once, got {self.prompt!r}")
        if self.label_words is not None:
            if isinstance(self.label_words, str) or len(self.label_words) < 2 or not all(
                    isinstance(w, str) and w.strip() for w in self.label_words):
                raise ValueError(f"data.label_words must be a list of >= 2 non-empty words, got {self.label_words!r}")
            object.__setattr__(self, "label_words", tuple(self.label_words))


@dataclass(frozen=True)
class ArmConfig:
    """One training arm."""
    name: str                          # unique name, e.g. "adamw+s2d" or "qat@W4A4"
    kind: str                          # one of ARM_KINDS, or "sweep"
    optimizer: str                     # "adamw" or "muon"
    s2d_config: S2DConfig | None = None  # S2D for this arm (None: off)
    qat_bits: Bits | None = None       # QAT at these bits (None: float training)
    cd_config: CDConfig | None = None  # Colinearity Decay for this arm (None: off)


@dataclass(frozen=True)
class QuantGridConfig:
    """The PTQ grid: bit settings x methods, and how each method is configured."""
    bits: tuple[Bits, ...] = (Bits(8, 8), Bits(6, 6), Bits(5, 5), Bits(4, 4), Bits(3, 4))  # settings, all methods
    methods: tuple[str, ...] = ("all",)   # PTQ method names ("all": every registered one)
    spec: dict = field(default_factory=dict)     # extra QuantConfig fields ([quant.spec]: a_range, ...)
    config: dict = field(default_factory=dict)   # method -> overrides of its config dataclass ([quant.config])
    method_bits: dict = field(default_factory=dict)  # method -> the settings it runs at (default: bits)

    def runs(self, method: str, bits: Bits) -> bool:
        """Whether the grid has a cell for ``method`` at ``bits``."""
        return bits in self.method_bits.get(method, self.bits)

    def quant_config(self, bits: Bits) -> QuantConfig:
        """The QuantConfig of one cell."""
        return QuantConfig(w_bits=bits.w, a_bits=bits.a, **self.spec)

    def method_config(self, method: str) -> object:
        """The method's config dataclass with this grid's overrides (paper defaults otherwise)."""
        return method_config(method, self.config.get(method, {}))


@dataclass(frozen=True)
class ProbeConfig:
    """The probes run on every trained arm."""
    batches: int = 2                   # test batches the per-layer table and violins are computed on
    sample_size: int = 2048            # activation values kept per FFN layer for the violins
    sensitivity_examples: int = 0      # test examples of the per-site sensitivity (first seed, baseline and
    #                                    S2D arms, RTN at the mildest setting costing the baseline > 5 pp); 0: off

    def __post_init__(self) -> None:
        check_int("probes.batches", self.batches, 1)
        check_int("probes.sample_size", self.sample_size, 1)
        check_int("probes.sensitivity_examples", self.sensitivity_examples, 0)


@dataclass(frozen=True)
class DeployConfig:
    """The optional "deployed (int8)" table: real integer kernels instead of fake quantization."""
    int8: bool = False                 # export each float arm's best W8A8 cell (per seed) to ONNX QDQ and score it
    #                                    on ONNX Runtime's integer kernels (`s2d run --deploy`; --quick: off)
    timing_repeats: int = 5            # timed forward passes of one test batch per backend (median)

    def __post_init__(self) -> None:
        if not isinstance(self.int8, bool):
            raise ValueError(f"deploy.int8 must be true or false, got {self.int8!r}")
        check_int("deploy.timing_repeats", self.timing_repeats, 1)


@dataclass(frozen=True)
class ExperimentConfig:
    """A fully validated `s2d run` config."""
    name: str                          # names the run directory
    seeds: tuple[int, ...]             # one training per arm and seed: head init, data order, dropout,
    #                                    calibration choice; every arm of a seed shares them (paired)
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    s2d_config: S2DConfig              # base for the S2D arms
    cd_config: CDConfig                # the adamw+cd arm's Colinearity Decay ([cd])
    min_refreshes: int                 # the S2D interval shrinks so that a run refreshes this often
    guard_examples: int                # validation examples whose loss guards the relative update (0: none)
    condition: ConditionConfig         # the adamw+condition arm's self-distillation
    arms: tuple[ArmConfig, ...]
    quant: QuantGridConfig
    probes: ProbeConfig
    deploy: DeployConfig               # the deployed (int8) table
    raw: dict                          # the merged TOML dict (what the fingerprint is taken of)

    def fingerprint(self) -> str:
        """sha256 of the canonical merged config without its seeds; a run directory belongs to exactly one.

        Left out: the seeds (results are stored per seed, so a run may be extended by more seeds),
        ``probes.sensitivity_examples`` and ``[deploy]`` (they add files and change no other result).
        """
        same = {k: v for k, v in self.raw.items() if k not in ("seed", "seeds", "deploy")}
        probes = {k: v for k, v in same.pop("probes", {}).items() if k != "sensitivity_examples"}
        if probes:
            same["probes"] = probes
        return hashlib.sha256(json.dumps(same, sort_keys=True, default=str).encode()).hexdigest()[:16]


def scale_interval(s2d_config: S2DConfig, total_steps: int, min_refreshes: int) -> tuple[S2DConfig, str | None]:
    """Shrink S2D's refresh interval so a run of ``total_steps`` refreshes >= ``min_refreshes`` times
    (it refreshes at steps 0, interval, 2·interval, ...).

    Returns (config, note); note explains the change (None when the interval is kept).
    """
    interval = s2d_config.interval
    if min_refreshes <= 0 or math.ceil(total_steps / interval) >= min_refreshes:
        return s2d_config, None
    new = max(1, total_steps // min_refreshes)
    note = (f"S2D interval scaled {interval} -> {new}: a {total_steps}-step run would refresh only "
            f"{math.ceil(total_steps / interval)} time(s) at interval {interval}; "
            f"min_refreshes = {min_refreshes}")
    return replace(s2d_config, interval=new), note
