"""Experiment configs for `s2d run`: TOML -> frozen, validated dataclasses.

Everything is checked here, before any model is loaded or trained: unknown sections/keys, arms,
PTQ methods, model and dataset names, and invalid values raise `ValueError` with one line naming the
field. `--quick` merges the config's `[quick]` tables over the rest (or a built-in shrink).
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from s2d.train import TrainConfig

ARM_KINDS = ("adamw", "adamw+s2d", "muon", "muon+s2d", "adamw+s2d-all", "qat", "qat+s2d")
SWEEP_KEYS = ("strength", "interval", "k_max", "tau", "power", "update")
SECTIONS = ("name", "seed", "model", "data", "train", "s2d", "arms", "sweep", "quant", "probes", "quick")

DEFAULT_TOML = """\
# Default `s2d run` (also shipped as configs/text-minilm-rt.toml): MiniLM-L6 (BERT, 6 layers) fine-tuned
# on Rotten Tomatoes sentiment. Sized for <= 20 minutes on a 2-core CPU for all arms and PTQ cells:
# the expensive PTQ methods (PTQ4ViT, ERQ) run at W4A4 only, PTQ4ViT with a shortened scale search,
# and QAT at W4A4 only (configs/gpu-dinov2-fmnist-full.toml runs the full grid).
name = "text-minilm-rt"
seed = 0

[model]
name = "minilm-l6"

[data]
dataset = "rotten-tomatoes"
max_length = 64
limit_train = 3840
limit_eval = 384
calib_samples = 32

[train]
steps = 120
lr = 1e-4
weight_decay = 0.01
warmup = 0.1
schedule = "linear"
batch_size = 32
eval_batch_size = 128
eval_every = 40
eval_batches = 1
log_every = 20
max_grad_norm = 1.0
save_every = 40
muon_lr = 1e-3   # Muon's orthogonalised steps need ~10x AdamW's lr here (at 1e-4 it stays at chance)

[s2d]            # paper defaults; interval is scaled down so that it refreshes >= min_refreshes times
strength = 5e-4
power = 2.0
tau = 0.95
k_max = 3
interval = 100
min_refreshes = 4

[arms]
names = ["adamw", "adamw+s2d", "muon", "adamw+s2d-all", "qat", "qat+s2d"]
qat_bits = ["W4A4"]

[quant]
bits = ["W8A8", "W6A6", "W5A5", "W4A4", "W3A4"]
methods = ["rtn", "repq", "ptq4vit", "erq"]
method_bits = { ptq4vit = ["W4A4"], erq = ["W4A4"] }

[quant.config]
ptq4vit = { n_candidates = 20, rounds = 1 }

[probes]
batches = 2
sample_size = 2048

[quick]          # `s2d run --quick`: the same pipeline, smaller (about 2-3 minutes on 2 cores)
train = { steps = 12, eval_every = 6, log_every = 6, eval_batches = 1, eval_batch_size = 32, save_every = 0 }
data = { limit_train = 384, limit_eval = 128 }
arms = { names = ["adamw", "adamw+s2d", "qat", "qat+s2d"] }
quant = { bits = ["W8A8", "W4A4"], methods = ["rtn", "repq"] }
probes = { batches = 1 }
"""


@dataclass(frozen=True)
class ModelSpec:
    """Which pretrained model to fine-tune: an s2d asset name, a local HF directory, or a hub id."""
    name: str
    image_size: int | None = None

    def __post_init__(self) -> None:
        _check_str("model.name", self.name)
        _opt_int("model.image_size", self.image_size, 1)


@dataclass(frozen=True)
class DataSpec:
    """Dataset (asset name or path) and loader sizes; limits count examples, calib_samples too."""
    dataset: str
    format: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    image_size: int | None = None
    limit_train: int | None = None
    limit_eval: int | None = None
    calib_samples: int = 32

    def __post_init__(self) -> None:
        _check_str("data.dataset", self.dataset)
        _opt_int("data.max_length", self.max_length, 1)
        _opt_int("data.image_size", self.image_size, 1)
        _opt_int("data.limit_train", self.limit_train, 1)
        _opt_int("data.limit_eval", self.limit_eval, 1)
        _opt_int("data.calib_samples", self.calib_samples, 1)
        if self.format not in (None, "csv", "jsonl", "imagefolder", "npz"):
            raise ValueError(f"data.format must be one of csv, jsonl, imagefolder, npz, got {self.format!r}")
        _check_str("data.text_column", self.text_column)
        _check_str("data.label_column", self.label_column)


@dataclass(frozen=True)
class ArmSpec:
    """One training arm: optimizer, S2D config (None = off), QAT bits (None = float training)."""
    name: str
    kind: str
    optimizer: str
    s2d: Any = None                    # S2DConfig | None
    qat_bits: tuple[int, int] | None = None


# PTQ method -> (module, config dataclass) for `[quant.config.<method>]` tables.
METHOD_CONFIGS = {"ptq4vit": ("s2d.quant.ptq4vit", "PTQ4ViTConfig"), "repq": ("s2d.quant.repq", "RepQConfig"),
                  "erq": ("s2d.quant.erq", "ERQConfig")}


@dataclass(frozen=True)
class QuantPlan:
    """PTQ grid: (w_bits, a_bits) settings x methods ("all" = every registered method).

    spec: extra QuantSpec fields (a_range, quantize_head, ...).  config: method -> overrides of its
    config dataclass (paper defaults otherwise).  method_bits: method -> the bit settings it runs at
    (default: all of `bits`), to keep expensive methods to the settings that matter on small machines.
    """
    bits: tuple[tuple[int, int], ...] = ((8, 8), (6, 6), (5, 5), (4, 4), (3, 4))
    methods: tuple[str, ...] = ("all",)
    spec: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    method_bits: dict = field(default_factory=dict)

    def runs(self, method: str, bits: tuple[int, int]) -> bool:
        """Whether the grid has a cell for `method` at `bits`."""
        return bits in self.method_bits.get(method, self.bits)

    def method_config(self, method: str) -> Any:
        """The method's config dataclass with this plan's overrides (None for config-less methods)."""
        if method not in METHOD_CONFIGS:
            return None
        import importlib

        module, cls = METHOD_CONFIGS[method]
        return getattr(importlib.import_module(module), cls)(**self.config.get(method, {}))


@dataclass(frozen=True)
class ProbeSpec:
    batches: int = 2
    sample_size: int = 2048

    def __post_init__(self) -> None:
        _opt_int("probes.batches", self.batches, 1)
        _opt_int("probes.sample_size", self.sample_size, 1)


@dataclass(frozen=True)
class ExperimentConfig:
    """A fully validated `s2d run` config. `raw` is the merged TOML dict (fingerprinted)."""
    name: str
    seed: int
    model: ModelSpec
    data: DataSpec
    train: TrainConfig
    s2d: Any                            # S2DConfig: base for the S2D arms
    min_refreshes: int
    arms: tuple[ArmSpec, ...]
    quant: QuantPlan
    probes: ProbeSpec
    raw: dict

    def fingerprint(self) -> str:
        """sha256 of the canonical merged config; a run directory belongs to exactly one."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- helpers

def _check_str(name: str, value: Any) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string, got {value!r}")


def _opt_int(name: str, value: Any, low: int) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < low):
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def parse_bits(text: str, name: str = "bit setting") -> tuple[int, int]:
    """"W4A4" -> (4, 4); bit widths must lie in [2, 16]. `name` is the field named in errors."""
    m = re.fullmatch(r"[Ww](\d+)[Aa](\d+)", text.strip()) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{name} must look like 'W4A4', got {text!r}")
    w, a = int(m.group(1)), int(m.group(2))
    if not (2 <= w <= 16 and 2 <= a <= 16):
        raise ValueError(f"{name}: bit widths must be in [2, 16], got {text!r}")
    return w, a


def _bits_list(name: str, value: Any, allow_empty: bool = False) -> tuple[tuple[int, int], ...]:
    """A TOML list of "WxAy" strings -> tuple of (w, a); errors name the field."""
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list like [\"W4A4\"], got {value!r}")
    out = tuple(parse_bits(b, name) for b in value)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} lists a bit setting twice: {value!r}")
    return out


def bits_name(bits: tuple[int, int]) -> str:
    return f"W{bits[0]}A{bits[1]}"


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _known(section: str, table: Any, cls: type | None, extra: tuple[str, ...] = ()) -> dict:
    """Copy of `table` after checking its keys are fields of `cls` (or in `extra`) and that each value
    has the type of the field's default (numbers for numbers, strings for strings, ...)."""
    if not isinstance(table, dict):
        raise ValueError(f"[{section}] must be a table, got {table!r}")
    allowed = ({f.name for f in fields(cls)} if cls is not None else set()) | set(extra)
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ValueError(f"unknown key {section}.{unknown[0]}; allowed: {', '.join(sorted(allowed))}")
    if cls is not None:
        defaults = {f.name: f.default for f in fields(cls)}
        for key, value in table.items():
            _check_type(f"{section}.{key}", value, defaults.get(key))
    return dict(table)


def _check_type(name: str, value: Any, default: Any) -> None:
    """Raise if `value` cannot stand for a field whose default is `default` (None/MISSING: no check)."""
    if isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif isinstance(default, float):
        ok, want = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    elif isinstance(default, str):
        ok, want = isinstance(value, str), "a string"
    elif isinstance(default, tuple):
        ok, want = isinstance(value, (list, tuple)), "a list"
    else:
        return
    if not ok:
        raise ValueError(f"{name} must be {want}, got {value!r}")


def available_methods() -> list[str]:
    """PTQ methods registered in `s2d.quant.apply` (method modules register themselves on import)."""
    from s2d.quant.apply import available_methods as registered

    return registered()


def _check_model(name: str) -> None:
    from s2d import assets

    if name in assets.REGISTRY:
        if assets.get(name).kind != "model":
            raise ValueError(f"model.name {name!r} is a dataset asset, not a model")
        return
    if Path(name).expanduser().exists() or name.startswith("timm:") or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
        return
    raise ValueError(f"unknown model.name {name!r}: not an s2d asset ({', '.join(sorted(assets.REGISTRY))}), "
                     "a local directory, or a hub id 'org/name'")


def _check_dataset(name: str) -> None:
    from s2d import assets

    if name in assets.REGISTRY:
        if assets.get(name).kind != "dataset":
            raise ValueError(f"data.dataset {name!r} is a model asset, not a dataset")
        return
    if not Path(name).expanduser().exists():
        raise ValueError(f"unknown data.dataset {name!r}: not an s2d dataset asset nor an existing path")


def scale_interval(s2d: Any, total_steps: int, min_refreshes: int) -> tuple[Any, str | None]:
    """Shrink S2D's refresh interval so a run of `total_steps` refreshes >= `min_refreshes` times.

    Returns (config, note); note explains the change (None when the interval is kept).
    """
    if min_refreshes <= 0 or math.ceil(total_steps / s2d.interval) >= min_refreshes:
        return s2d, None
    new = max(1, total_steps // min_refreshes)
    note = (f"S2D interval scaled {s2d.interval} -> {new}: a {total_steps}-step run would refresh only "
            f"{math.ceil(total_steps / s2d.interval)} time(s) at interval {s2d.interval}; "
            f"min_refreshes = {min_refreshes}")
    return replace(s2d, interval=new), note


# --------------------------------------------------------------------------- build

def _build_arms(table: dict, sweep: dict, base_s2d: Any) -> tuple[ArmSpec, ...]:
    table = _known("arms", table, None, ("names", "qat_bits"))
    names = table.get("names", ["adamw", "adamw+s2d"])
    if not isinstance(names, list) or not names:
        raise ValueError(f"arms.names must be a non-empty list, got {names!r}")
    qat_bits = _bits_list("arms.qat_bits", table.get("qat_bits", ["W4A4", "W3A4"]), allow_empty=True)
    all_s2d = replace(base_s2d, selection="all")
    arms: list[ArmSpec] = []
    for kind in names:
        if not isinstance(kind, str) or kind not in ARM_KINDS:
            raise ValueError(f"unknown arm {kind!r} in arms.names; allowed: {', '.join(ARM_KINDS)}")
        opt = "muon" if kind.startswith("muon") else "adamw"
        s2d = all_s2d if kind == "adamw+s2d-all" else base_s2d if kind.endswith("+s2d") else None
        if kind.startswith("qat"):
            if not qat_bits:
                raise ValueError("arms.qat_bits must list at least one bit setting for QAT arms")
            arms += [ArmSpec(f"{kind}@{bits_name(b)}", kind, opt, s2d, b) for b in qat_bits]
        else:
            arms.append(ArmSpec(kind, kind, opt, s2d, None))
    for key, values in sweep.items():
        if key not in SWEEP_KEYS:
            raise ValueError(f"unknown sweep key sweep.{key}; allowed: {', '.join(SWEEP_KEYS)}")
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.{key} must be a non-empty list, got {values!r}")
        for v in values:
            arms.append(ArmSpec(f"adamw+s2d[{key}={v}]", "sweep", "adamw", replace(base_s2d, **{key: v})))
    seen = [a.name for a in arms]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise ValueError(f"arms: duplicate arm {sorted(dup)[0]!r}")
    return tuple(arms)


def _build_quant(table: dict, quick: bool = False) -> QuantPlan:
    from s2d.quant.apply import QuantSpec

    table = _known("quant", table, None, tuple(f.name for f in fields(QuantPlan)))
    bits = _bits_list("quant.bits", table.get("bits", ["W8A8", "W6A6", "W5A5", "W4A4", "W3A4"]), allow_empty=True)
    methods = table.get("methods", ["all"])
    if isinstance(methods, str):
        methods = [methods]
    if not isinstance(methods, list) or not methods:
        raise ValueError(f"quant.methods must list at least one method (or 'all'), got {methods!r}")
    registered = available_methods()
    for m in methods:
        if m != "all" and m not in registered:
            raise ValueError(f"unknown PTQ method {m!r} in quant.methods; registered: {', '.join(registered)}")
    spec = _known("quant.spec", table.get("spec", {}), QuantSpec)
    for key in ("w_bits", "a_bits"):
        if key in spec:
            raise ValueError(f"quant.spec.{key} is set per cell from quant.bits; remove it from [quant.spec]")
    QuantSpec(**spec)                                    # validates the extra fields
    method_bits = {}
    for m, settings in _known("quant.method_bits", table.get("method_bits", {}), None, tuple(registered)).items():
        method_bits[m] = _bits_list(f"quant.method_bits.{m}", settings, allow_empty=True)
        extra = [bits_name(b) for b in method_bits[m] if b not in bits]
        if extra and not quick:                          # --quick may shrink quant.bits below method_bits
            raise ValueError(f"quant.method_bits.{m}: {extra[0]} is not in quant.bits "
                             f"[{', '.join(map(bits_name, bits))}]")
    configs = _known("quant.config", table.get("config", {}), None, tuple(METHOD_CONFIGS))
    for m, over in configs.items():
        _known(f"quant.config.{m}", over, _method_config_class(m))
    plan = QuantPlan(bits=bits, methods=tuple(methods), spec=dict(spec), config=dict(configs),
                     method_bits=method_bits)
    for m in configs:
        plan.method_config(m)                            # validates the values
    return plan


def _method_config_class(method: str) -> type:
    import importlib

    module, cls = METHOD_CONFIGS[method]
    return getattr(importlib.import_module(module), cls)


def from_dict(raw: dict, quick: bool = False, check_names: bool = True) -> ExperimentConfig:
    """Validate a config dict (parsed TOML). `quick` merges the `[quick]` tables first.

    check_names=False skips the model/dataset existence checks (for tests of other fields).
    """
    from s2d.decay import S2DConfig

    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section {unknown[0]!r}; allowed: {', '.join(SECTIONS)}")
    quick_over = raw.get("quick", {})
    if not isinstance(quick_over, dict):
        raise ValueError(f"[quick] must be a table of section overrides, got {quick_over!r}")
    bad = sorted(set(quick_over) - set(SECTIONS) - {"quick"}) or sorted(k for k in quick_over if k == "quick")
    if bad:
        raise ValueError(f"unknown section quick.{bad[0]}; allowed: {', '.join(s for s in SECTIONS if s != 'quick')}")
    if not quick and quick_over:
        try:                                     # a typo in [quick] fails now, not at the first --quick run
            from_dict(raw, quick=True, check_names=False)
        except ValueError as err:
            raise ValueError(f"[quick]: {err}") from None
    merged = {k: v for k, v in raw.items() if k != "quick"}
    if quick:
        over = quick_over if quick_over else _DEFAULT_QUICK
        merged = _deep_merge(merged, over)
        quick_train = over.get("train", {}) if isinstance(over.get("train"), dict) else {}
        for key, other in (("steps", "epochs"), ("epochs", "steps")):   # a quick run length replaces the other
            if key in quick_train and isinstance(merged.get("train"), dict):
                merged["train"].pop(other, None)
        merged["quick"] = True
    for sec in ("model", "data"):
        if sec not in merged:
            raise ValueError(f"config needs a [{sec}] section")
    model = ModelSpec(**_known("model", merged["model"], ModelSpec))
    data = DataSpec(**_known("data", merged["data"], DataSpec))
    train_tab = _known("train", merged.get("train", {"steps": 100}), TrainConfig)
    seed = merged.get("seed", 0)
    _opt_int("seed", seed, 0)
    train = TrainConfig(**{"seed": seed, **train_tab})
    s2d_tab = _known("s2d", merged.get("s2d", {}), S2DConfig, ("min_refreshes",))
    min_refreshes = s2d_tab.pop("min_refreshes", 4)
    _opt_int("s2d.min_refreshes", min_refreshes, 0)
    if "include" in s2d_tab and isinstance(s2d_tab["include"], list):
        s2d_tab["include"] = tuple(s2d_tab["include"])
    base_s2d = S2DConfig(**s2d_tab)
    sweep = _known("sweep", merged.get("sweep", {}), None, SWEEP_KEYS)
    arms = _build_arms(merged.get("arms", {}), sweep, base_s2d)
    quant = _build_quant(merged.get("quant", {}), quick)
    probes = ProbeSpec(**_known("probes", merged.get("probes", {}), ProbeSpec))
    name = merged.get("name", "experiment")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '+', '-' "
                         f"(it names the run directory), got {name!r}")
    if check_names:
        _check_model(model.name)
        _check_dataset(data.dataset)
    return ExperimentConfig(name=name, seed=seed, model=model, data=data, train=train, s2d=base_s2d,
                            min_refreshes=min_refreshes, arms=arms, quant=quant, probes=probes, raw=merged)


_DEFAULT_QUICK = {"train": {"steps": 24, "eval_every": 8, "log_every": 8},
                  "data": {"limit_train": 800, "limit_eval": 128}, "probes": {"batches": 1}}


def load_config(path: str | Path | None = None, quick: bool = False, check_names: bool = True) -> ExperimentConfig:
    """Read and validate a TOML config; None = the embedded default (MiniLM-L6 on Rotten Tomatoes)."""
    if path is None:
        text = DEFAULT_TOML
    else:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        text = p.read_text()
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path or 'default config'}: invalid TOML: {err}") from None
    try:
        return from_dict(raw, quick=quick, check_names=check_names)
    except TypeError as err:   # wrong value types reaching a dataclass
        raise ValueError(f"{path or 'default config'}: {err}") from None
