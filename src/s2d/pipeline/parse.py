"""TOML -> :class:`~s2d.pipeline.config.ExperimentConfig`, every field checked before anything runs.

Unknown sections/keys, arms, PTQ methods, model and dataset names, and invalid values raise
``ValueError`` with one line naming the field. ``--quick`` merges the config's ``[quick]`` tables over
the rest (or a built-in shrink). The default config is ``configs/text-minilm-rt.toml``, shipped as
package data (:data:`DEFAULT_CONFIG`).
"""
from __future__ import annotations

import copy
import re
import tomllib
from dataclasses import fields, replace
from importlib import resources
from pathlib import Path

from s2d import assets
from s2d.colinearity import CDConfig
from s2d.pipeline.config import (
    ARM_KINDS, SECTIONS, SWEEP_KEYS, ArmConfig, DataConfig, DeployConfig, ExperimentConfig, ModelConfig, ProbeConfig,
    QuantGridConfig, check_int,
)
from s2d.quant import Bits, QuantConfig, available_methods
from s2d.quant.api import method_config_class
from s2d.regularizer import S2DConfig
from s2d.train import ConditionConfig, TrainConfig

__all__ = ["DEFAULT_CONFIG", "default_config_text", "load_config", "from_dict"]

DEFAULT_CONFIG = "text-minilm-rt.toml"      # in s2d/configs/ (the repository's configs/ links there)
# `--quick` for a config without a [quick] table
_DEFAULT_QUICK = {"train": {"steps": 24, "eval_every": 8, "log_every": 8},
                  "data": {"limit_train": 800, "limit_eval": 128}, "probes": {"batches": 1}}


def default_config_text() -> str:
    """The TOML text of the default config (MiniLM-L6 on Rotten Tomatoes)."""
    return resources.files("s2d").joinpath("configs", DEFAULT_CONFIG).read_text(encoding="utf-8")


def load_config(path: str | Path | None = None, quick: bool = False, check_names: bool = True,
                seeds: list[int] | None = None, deploy: bool = False) -> ExperimentConfig:
    """Read and validate a TOML config; None = the default config. ``seeds`` replaces the config's;
    ``deploy`` turns on ``[deploy] int8``."""
    if path is None:
        text = default_config_text()
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
        return from_dict(raw, quick=quick, check_names=check_names, seeds=seeds, deploy=deploy)
    except TypeError as err:   # wrong value types reaching a dataclass
        raise ValueError(f"{path or 'default config'}: {err}") from None


def from_dict(raw: dict, quick: bool = False, check_names: bool = True,
              seeds: list[int] | None = None, deploy: bool = False) -> ExperimentConfig:
    """Validate a config dict (parsed TOML). ``quick`` merges the ``[quick]`` tables first; ``seeds``
    (the CLI's ``--seeds``) then replaces the seeds; ``deploy`` (``--deploy``) sets ``[deploy] int8``,
    which ``quick`` always turns off.

    check_names=False skips the model/dataset existence checks (for tests of other fields).
    """
    merged = _merge_quick(raw, quick)
    if seeds is not None:
        merged = {k: v for k, v in merged.items() if k != "seed"} | {"seeds": list(seeds)}
    for sec in ("model", "data"):
        if sec not in merged:
            raise ValueError(f"config needs a [{sec}] section")
    model = ModelConfig(**_known("model", merged["model"], ModelConfig))
    data = DataConfig(**_known("data", merged["data"], DataConfig))
    seeds = _seeds(merged)
    train_tab = _known("train", merged.get("train", {"steps": 100}), TrainConfig)
    if "seed" in train_tab:
        raise ValueError("train.seed is set per run from the top-level seeds = [...]; remove it from [train]")
    train = TrainConfig(**{"seed": seeds[0], **train_tab})
    s2d_tab = _known("s2d", merged.get("s2d", {}), S2DConfig, ("min_refreshes", "guard_examples"))
    min_refreshes = s2d_tab.pop("min_refreshes", 4)
    check_int("s2d.min_refreshes", min_refreshes, 0)
    guard_examples = s2d_tab.pop("guard_examples", 0)
    check_int("s2d.guard_examples", guard_examples, 0)
    if "include" in s2d_tab and isinstance(s2d_tab["include"], list):
        s2d_tab["include"] = tuple(s2d_tab["include"])
    base_s2d = S2DConfig(**s2d_tab)
    sweep = _known("sweep", merged.get("sweep", {}), None, SWEEP_KEYS)
    cond_tab = _known("condition", merged.get("condition", {}), ConditionConfig)
    if "seed" in cond_tab:
        raise ValueError("condition.seed is set per run from the top-level seeds = [...]; remove it from [condition]")
    condition = ConditionConfig(**{**cond_tab, "seed": seeds[0]})
    cd_config = CDConfig(**_known("cd", merged.get("cd", {}), CDConfig))
    arms = _build_arms(merged.get("arms", {}), sweep, base_s2d, cd_config)
    quant = _build_quant(merged.get("quant", {}), quick)
    probes = ProbeConfig(**_known("probes", merged.get("probes", {}), ProbeConfig))
    deploy_tab = _known("deploy", merged.get("deploy", {}), DeployConfig)
    deploy_cfg = DeployConfig(**{**deploy_tab, "int8": (deploy or deploy_tab.get("int8", False)) and not quick})
    name = merged.get("name", "experiment")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][\w.+-]*", name):
        raise ValueError(f"name must be a non-empty string of letters, digits, '_', '.', '+', '-' "
                         f"(it names the run directory), got {name!r}")
    if check_names:
        _check_asset("model.name", model.name, "model")
        _check_asset("data.dataset", data.dataset, "dataset")
    return ExperimentConfig(name=name, seeds=seeds, model=model, data=data, train=train, s2d_config=base_s2d,
                            cd_config=cd_config,
                            min_refreshes=min_refreshes, guard_examples=guard_examples, condition=condition,
                            arms=arms, quant=quant, probes=probes, deploy=deploy_cfg,
                            raw=merged)


def _seeds(merged: dict) -> tuple[int, ...]:
    """``seeds = [0, 1, 2]``, or the older ``seed = 0`` (one seed); default (0,)."""
    if "seed" in merged and "seeds" in merged:
        raise ValueError("set either seeds = [...] or seed = N, not both")
    if "seeds" not in merged:
        seed = merged.get("seed", 0)
        check_int("seed", seed, 0)
        return (seed,)
    seeds = merged["seeds"]
    if not isinstance(seeds, list) or not seeds:
        raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    for s in seeds:
        check_int("seeds", s, 0)
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"seeds lists a seed twice: {seeds!r}")
    return tuple(seeds)


def _merge_quick(raw: dict, quick: bool) -> dict:
    """The config with its ``[quick]`` overrides merged in when ``quick`` (checked either way)."""
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
    if not quick:
        return merged
    over = quick_over if quick_over else _DEFAULT_QUICK
    if "seeds" in over or "seed" in over:          # the quick seeds replace the others, in either spelling
        merged = {k: v for k, v in merged.items() if k not in ("seed", "seeds")}
    merged = _deep_merge(merged, over)
    quick_train = over.get("train", {}) if isinstance(over.get("train"), dict) else {}
    for key, other in (("steps", "epochs"), ("epochs", "steps")):   # a quick run length replaces the other
        if key in quick_train and isinstance(merged.get("train"), dict):
            merged["train"].pop(other, None)
    merged["quick"] = True
    return merged


def _build_arms(table: dict, sweep: dict, base_s2d: S2DConfig, cd_config: CDConfig) -> tuple[ArmConfig, ...]:
    table = _known("arms", table, None, ("names", "qat_bits"))
    names = table.get("names", ["adamw", "adamw+s2d"])
    if not isinstance(names, list) or not names:
        raise ValueError(f"arms.names must be a non-empty list, got {names!r}")
    qat_bits = _bits_list("arms.qat_bits", table.get("qat_bits", ["W4A4", "W3A4"]), allow_empty=True)
    variants = {"adamw+s2d-all": replace(base_s2d, selection="all"),
                "adamw+s2d-rel": replace(base_s2d, update="relative"),
                "adamw+condition": replace(base_s2d, update="relative")}
    arms: list[ArmConfig] = []
    for kind in names:
        if not isinstance(kind, str) or kind not in ARM_KINDS:
            raise ValueError(f"unknown arm {kind!r} in arms.names; allowed: {', '.join(ARM_KINDS)}")
        if kind == "adamw+condition" and "adamw" not in names[: names.index(kind)]:
            raise ValueError("arms.names: adamw+condition conditions the adamw arm; list \"adamw\" before it")
        opt = "muon" if kind.startswith("muon") else "adamw"
        s2d = variants.get(kind, base_s2d if kind.endswith("+s2d") else None)
        if kind.startswith("qat"):
            if not qat_bits:
                raise ValueError("arms.qat_bits must list at least one bit setting for QAT arms")
            arms += [ArmConfig(f"{kind}@{b.name}", kind, opt, s2d, b) for b in qat_bits]
        else:
            arms.append(ArmConfig(kind, kind, opt, s2d, None, cd_config if kind == "adamw+cd" else None))
    for key, values in sweep.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep.{key} must be a non-empty list, got {values!r}")
        for v in values:
            arms.append(ArmConfig(f"adamw+s2d[{key}={v}]", "sweep", "adamw", replace(base_s2d, **{key: v})))
    seen = [a.name for a in arms]
    dup = {n for n in seen if seen.count(n) > 1}
    if dup:
        raise ValueError(f"arms: duplicate arm {sorted(dup)[0]!r}")
    return tuple(arms)


def _build_quant(table: dict, quick: bool = False) -> QuantGridConfig:
    table = _known("quant", table, None, tuple(f.name for f in fields(QuantGridConfig)))
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
    spec = _known("quant.spec", table.get("spec", {}), QuantConfig)
    for key in ("w_bits", "a_bits"):
        if key in spec:
            raise ValueError(f"quant.spec.{key} is set per cell from quant.bits; remove it from [quant.spec]")
    QuantConfig(**spec)                                  # validates the extra fields
    method_bits = {}
    for m, settings in _known("quant.method_bits", table.get("method_bits", {}), None, tuple(registered)).items():
        method_bits[m] = _bits_list(f"quant.method_bits.{m}", settings, allow_empty=True)
        extra = [b.name for b in method_bits[m] if b not in bits]
        if extra and not quick:                          # --quick may shrink quant.bits below method_bits
            raise ValueError(f"quant.method_bits.{m}: {extra[0]} is not in quant.bits "
                             f"[{', '.join(b.name for b in bits)}]")
    configs = _known("quant.config", table.get("config", {}), None, tuple(registered))
    for m, over in configs.items():
        _known(f"quant.config.{m}", over, method_config_class(m))
    grid = QuantGridConfig(bits=bits, methods=tuple(methods), spec=dict(spec), config=dict(configs),
                           method_bits=method_bits)
    for m in configs:
        grid.method_config(m)                            # validates the values
    return grid


def _bits_list(name: str, value: object, allow_empty: bool = False) -> tuple[Bits, ...]:
    """A TOML list of "WxAy" strings -> tuple of Bits; errors name the field."""
    if not isinstance(value, list) or (not value and not allow_empty):
        raise ValueError(f"{name} must be a {'' if allow_empty else 'non-empty '}list like [\"W4A4\"], got {value!r}")
    out = tuple(Bits.parse(b, name) for b in value)
    if len(set(out)) != len(out):
        raise ValueError(f"{name} lists a bit setting twice: {value!r}")
    return out


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _known(section: str, table: object, cls: type | None, extra: tuple[str, ...] = ()) -> dict:
    """Copy of ``table`` after checking its keys are fields of ``cls`` (or in ``extra``) and that each value
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


def _check_type(name: str, value: object, default: object) -> None:
    """Raise if ``value`` cannot stand for a field whose default is ``default`` (None/MISSING: no check)."""
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


def _check_asset(field: str, name: str, kind: str) -> None:
    """ValueError unless ``name`` is an s2d asset of ``kind`` or (models) a path / hub id, (datasets) a path."""
    if name in assets.REGISTRY:
        if assets.get(name).kind != kind:
            raise ValueError(f"{field} {name!r} is a {assets.get(name).kind} asset, not a {kind}")
        return
    if Path(name).expanduser().exists():
        return
    if kind == "model":
        if name.startswith("timm:") or re.fullmatch(r"[\w.-]+/[\w.-]+", name):
            return
        raise ValueError(f"unknown {field} {name!r}: not an s2d asset ({', '.join(sorted(assets.REGISTRY))}), "
                         "a local directory, or a hub id 'org/name'")
    raise ValueError(f"unknown {field} {name!r}: not an s2d dataset asset nor an existing path")
