"""s2d.pipeline.parse / config: TOML -> validated ExperimentConfig.

Checks: every invalid field fails with ONE line naming that field (before anything is loaded), the
`--quick` merge, the fingerprint (stable under key order / comments, sensitive to values), the S2D
interval scaling against its closed form, the embedded default and every shipped configs/*.toml.
"""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest

from s2d.colinearity import CDConfig
from s2d.pipeline.config import ARM_KINDS, scale_interval
from s2d.pipeline.parse import default_config_text, from_dict, load_config
from s2d.quant import Bits, RTNConfig
from s2d.regularizer import S2DConfig

REPO = Path(__file__).resolve().parents[1]

BASE = {
    "name": "t",
    "model": {"name": "minilm-l6"},
    "data": {"dataset": "rotten-tomatoes"},
    "train": {"steps": 10},
    "arms": {"names": ["adamw", "adamw+s2d", "qat"], "qat_bits": ["W4A4"]},
    "quant": {"bits": ["W8A8", "W4A4"], "methods": ["rtn"]},
}


def with_(path: str, value) -> dict:
    """BASE with the dotted `path` set to `value` (sections created as needed)."""
    raw = copy.deepcopy(BASE)
    *heads, last = path.split(".")
    node = raw
    for h in heads:
        node = node.setdefault(h, {})
    node[last] = value
    return raw


def test_base_builds_expected_arms_and_plan():
    cfg = from_dict(BASE)
    assert [a.name for a in cfg.arms] == ["adamw", "adamw+s2d", "qat@W4A4"]
    adamw, s2d, qat = cfg.arms
    assert (adamw.s2d_config, adamw.qat_bits, s2d.qat_bits) == (None, None, None)
    assert s2d.s2d_config == S2DConfig() and qat.qat_bits == (4, 4) and qat.s2d_config is None
    assert cfg.quant.bits == ((8, 8), (4, 4)) and cfg.quant.methods == ("rtn",)
    assert cfg.train.steps == 10 and cfg.train.seed == 0


def test_all_arm_kinds_and_sweep():
    raw = with_("arms.names", list(ARM_KINDS))
    raw["arms"]["qat_bits"] = ["W4A4", "W3A4"]
    raw["sweep"] = {"strength": [1e-3, 1e-4]}
    cfg = from_dict(raw)
    by = {a.name: a for a in cfg.arms}
    assert by["adamw+s2d-all"].s2d_config.selection == "all"
    assert by["muon+s2d"].optimizer == "muon" and by["muon+s2d"].s2d_config is not None
    assert {n for n in by if n.startswith("qat")} == {"qat@W4A4", "qat@W3A4", "qat+s2d@W4A4", "qat+s2d@W3A4"}
    assert by["adamw+s2d[strength=0.001]"].s2d_config.strength == 1e-3
    assert by["adamw+cd"].cd_config == CDConfig() and by["adamw+cd"].s2d_config is None
    assert all(a.cd_config is None for n, a in by.items() if n != "adamw+cd")


BAD = [
    ({**BASE, "trainer": {}}, "unknown config section 'trainer'"),
    (with_("train.stepz", 3), "unknown key train.stepz"),
    (with_("cd.strength", -1.0), "CDConfig.strength must be a finite number >= 0"),
    (with_("cd.keep", 1), "unknown key cd.keep"),
    (with_("model.revision", "x"), "unknown key model.revision"),
    (with_("arms.names", ["adamw", "sgd"]), "unknown arm 'sgd' in arms.names"),
    (with_("arms.names", []), "arms.names must be a non-empty list"),
    (with_("arms.names", ["adamw", "adamw"]), "duplicate arm 'adamw'"),
    (with_("arms.qat_bits", ["W1A4"]), "arms.qat_bits: bit widths must be 2..8 or 16 (the reference), got 'W1A4'"),
    (with_("arms.qat_bits", "W4A4"), "arms.qat_bits must be a list"),
    (with_("quant.bits", ["W4A17"]), "quant.bits: bit widths must be 2..8 or 16 (the reference), got 'W4A17'"),
    (with_("quant.bits", ["4/4"]), "quant.bits must look like 'W4A4', got '4/4'"),
    (with_("quant.bits", ["W4A4", "w4a4"]), "quant.bits lists a bit setting twice"),
    (with_("quant.methods", ["rtn", "gptq"]), "unknown PTQ method 'gptq' in quant.methods"),
    (with_("quant.methods", []), "quant.methods must list at least one method"),
    (with_("quant.spec", {"a_range": "median"}), "QuantConfig.a_range"),
    (with_("quant.spec", {"bogus": 1}), "unknown key quant.spec.bogus"),
    (with_("quant.spec", {"w_bits": 4}), "quant.spec.w_bits is set per cell"),
    (with_("quant.method_bits", {"gptq": ["W4A4"]}), "unknown key quant.method_bits.gptq"),
    (with_("quant.method_bits", {"rtn": ["W6A6"]}), "quant.method_bits.rtn: W6A6 is not in quant.bits"),
    (with_("quant.config", {"gptq": {}}), "unknown key quant.config.gptq"),
    (with_("quant.config", {"rtn": {"nope": 1}}), "unknown key quant.config.rtn.nope"),
    (with_("quant.config", {"repq": {"nope": 1}}), "unknown key quant.config.repq.nope"),
    (with_("train.steps", 0), "TrainConfig.steps must be an integer >= 1"),
    (with_("train.lr", -1.0), "TrainConfig.lr"),
    (with_("train.warmup", "ten"), "train.warmup must be a number, got 'ten'"),
    (with_("train.batch_size", 2.5), "train.batch_size must be an integer"),
    (with_("train.schedule", "step"), "TrainConfig.schedule"),
    (with_("s2d.tau", 1.5), "S2DConfig.tau must be in (0, 1]"),
    (with_("s2d.k_max", 0), "S2DConfig.k_max"),
    (with_("s2d.update", 3), "s2d.update must be a string"),
    (with_("s2d.min_refreshes", -1), "s2d.min_refreshes must be an integer >= 0"),
    (with_("sweep.strength", []), "sweep.strength must be a non-empty list"),
    (with_("sweep.lr", [1e-4]), "unknown key sweep.lr"),
    (with_("sweep.tau", [2.0]), "S2DConfig.tau"),
    (with_("data.max_length", 0), "data.max_length must be an integer >= 1"),
    (with_("data.format", "parquet"), "data.format must be one of"),
    (with_("data.limit_train", True), "data.limit_train must be an integer >= 1"),
    (with_("probes.batches", 0), "probes.batches must be an integer >= 1"),
    (with_("seed", -1), "seed must be an integer >= 0"),
    (with_("name", "../escape"), "name must be a non-empty string"),
    (with_("quick.trian", {"steps": 1}), "unknown section quick.trian"),
    (with_("quick.train", {"steps": -1}), "[quick]: TrainConfig.steps"),
    ({k: v for k, v in BASE.items() if k != "model"}, "config needs a [model] section"),
]


@pytest.mark.parametrize("raw, message", BAD, ids=[m[:40] for _, m in BAD])
def test_invalid_config_one_line_naming_field(raw, message):
    with pytest.raises(ValueError) as info:
        from_dict(raw, check_names=False)
    text = str(info.value)
    assert message in text
    assert "\n" not in text


@pytest.mark.parametrize("path, value, message", [
    ("model.name", "no-such-model", "unknown model.name 'no-such-model'"),
    ("model.name", "rotten-tomatoes", "is a dataset asset, not a model"),
    ("data.dataset", "no-such-data", "unknown data.dataset 'no-such-data'"),
    ("data.dataset", "minilm-l6", "is a model asset, not a dataset"),
])
def test_unknown_model_or_dataset(path, value, message):
    with pytest.raises(ValueError, match=message):
        from_dict(with_(path, value))


def test_local_paths_accepted(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "d.csv").write_text("text,label\na,0\n")
    cfg = from_dict(with_("data.dataset", str(tmp_path / "d.csv")) | {"model": {"name": str(tmp_path / "model")}})
    assert cfg.model.name == str(tmp_path / "model")


@pytest.mark.parametrize("text, expected", [("W8A8", (8, 8)), ("w3a4", (3, 4)), (" W16A2 ", (16, 2))])
def test_parse_bits(text, expected):
    assert Bits.parse(text) == expected
    assert Bits(*expected).name == text.strip().upper()


@pytest.mark.parametrize("text", ["W1A4", "W4A17", "W2A9", "W4", "A4W4", "", "W4A4x"])
def test_parse_bits_rejects(text):
    with pytest.raises(ValueError, match="bit"):
        Bits.parse(text)


def test_quick_merge_own_table_and_builtin():
    raw = with_("quick", {"train": {"steps": 2}, "data": {"limit_train": 16}})
    full, quick = from_dict(raw, check_names=False), from_dict(raw, quick=True, check_names=False)
    assert (full.train.steps, full.data.limit_train) == (10, None)
    assert (quick.train.steps, quick.data.limit_train) == (2, 16)
    assert quick.train.lr == full.train.lr and quick.arms == full.arms       # the rest is kept
    assert quick.fingerprint() != full.fingerprint()
    builtin = from_dict(BASE, quick=True, check_names=False)                 # no [quick]: built-in shrink
    assert builtin.train.steps == 24 and builtin.data.limit_train == 800 and builtin.probes.batches == 1


def test_fingerprint_stable_and_value_sensitive(tmp_path):
    text_a = '# comment\nname = "t"\n[model]\nname = "minilm-l6"\n[data]\ndataset = "rotten-tomatoes"\n' \
             '[train]\nsteps = 5\nlr = 1e-4\n'
    text_b = 'name = "t"\n[train]\nlr = 0.0001\nsteps = 5\n\n[data]\ndataset = "rotten-tomatoes"\n' \
             '[model]\nname = "minilm-l6"\n'                          # other order, no comment, 1e-4 spelt out
    (tmp_path / "a.toml").write_text(text_a)
    (tmp_path / "b.toml").write_text(text_b)
    fa, fb = load_config(tmp_path / "a.toml").fingerprint(), load_config(tmp_path / "b.toml").fingerprint()
    assert fa == fb and len(fa) == 16
    assert load_config(tmp_path / "a.toml").fingerprint() == fa                # repeatable
    (tmp_path / "c.toml").write_text(text_a.replace("steps = 5", "steps = 6"))
    assert load_config(tmp_path / "c.toml").fingerprint() != fa
    (tmp_path / "d.toml").write_text(text_a + "[probes]\nsensitivity_examples = 64\n")   # adds files only
    assert load_config(tmp_path / "d.toml").fingerprint() == fa
    (tmp_path / "e.toml").write_text(text_a + "[probes]\nbatches = 3\nsensitivity_examples = 64\n")
    assert load_config(tmp_path / "e.toml").fingerprint() != fa


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[model\nname = 1\n")
    with pytest.raises(ValueError, match="invalid TOML") as info:
        load_config(tmp_path / "bad.toml")
    assert "\n" not in str(info.value)


def test_embedded_default_parses():
    cfg = load_config(None)
    assert cfg.name == "text-minilm-rt" and cfg.model.name == "minilm-l6" and cfg.seeds == (0, 1, 2)
    assert [a.name for a in cfg.arms] == ["adamw", "adamw+s2d"] and cfg.data.limit_eval == 1281
    assert cfg.quant.bits == ((5, 5), (4, 4)) and cfg.quant.methods == ("rtn", "repq")
    assert cfg.probes.sensitivity_examples == 128
    assert cfg.s2d_config == S2DConfig(strength=5e-4, power=2.0, tau=0.95, k_max=3, interval=100)
    quick = load_config(None, quick=True)
    assert quick.train.steps < cfg.train.steps and quick.fingerprint() != cfg.fingerprint()
    assert quick.seeds == (0, 1) and load_config(None, quick=True, seeds=[5]).seeds == (5,)


def test_seeds_key_and_fingerprint():
    assert from_dict(BASE).seeds == (0,) and from_dict({**BASE, "seed": 3}).seeds == (3,)
    three = from_dict({**BASE, "seeds": [0, 1, 2]})
    assert three.seeds == (0, 1, 2) and three.train.seed == 0
    assert three.fingerprint() == from_dict(BASE).fingerprint()      # seeds extend a run, same folder
    assert from_dict(BASE, seeds=[4, 5]).seeds == (4, 5)
    for bad, msg in (({"seeds": []}, "seeds must be a non-empty list"), ({"seeds": [0, 0]}, "lists a seed twice"),
                     ({"seeds": [0, -1]}, "seeds must be an integer >= 0"),
                     ({"seeds": [0], "seed": 0}, "either seeds"),
                     ({"train": {"steps": 10, "seed": 1}}, "train.seed is set per run")):
        with pytest.raises(ValueError, match=msg):
            from_dict({**BASE, **bad})


def test_deploy_section_flag_quick_and_fingerprint():
    assert from_dict(BASE).deploy.int8 is False
    on = from_dict({**BASE, "deploy": {"int8": True, "timing_repeats": 3}})
    assert on.deploy.int8 and on.deploy.timing_repeats == 3
    assert from_dict(BASE, deploy=True).deploy.int8                          # `s2d run --deploy`
    assert not from_dict({**BASE, "deploy": {"int8": True}}, quick=True).deploy.int8  # --quick skips it
    assert not from_dict(BASE, quick=True, deploy=True).deploy.int8
    assert on.fingerprint() == from_dict(BASE).fingerprint()   # adds files, changes no other result
    for bad, msg in (({"int8": "yes"}, "deploy.int8"), ({"timing_repeats": 0}, "deploy.timing_repeats"),
                     ({"fast": True}, "unknown key deploy.fast")):
        with pytest.raises(ValueError, match=msg):
            from_dict({**BASE, "deploy": bad})


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    for quick in (False, True):
        cfg = load_config(path, quick=quick, check_names=False)
        assert cfg.arms and cfg.train.total_steps(100) >= 1


@pytest.mark.parametrize("interval, steps, min_refreshes", [(100, 24, 4), (100, 1000, 4), (10, 25, 4),
                                                             (100, 3, 4), (100, 50, 0)])
def test_scale_interval_closed_form(interval, steps, min_refreshes):
    new, note = scale_interval(S2DConfig(interval=interval), steps, min_refreshes)
    if min_refreshes == 0 or math.ceil(steps / interval) >= min_refreshes:
        assert new.interval == interval and note is None
    else:
        assert new.interval == max(1, steps // min_refreshes)
        assert math.ceil(steps / new.interval) >= min(min_refreshes, steps)
        assert note.startswith(f"S2D interval scaled {interval} -> {new.interval}")


def test_method_bits_and_config_overrides():
    raw = with_("quant.methods", ["rtn", "repq"])
    raw["quant"]["method_bits"] = {"repq": ["W4A4"]}
    raw["quant"]["config"] = {"repq": {"reparam": False}}
    plan = from_dict(raw, check_names=False).quant
    assert plan.runs("rtn", (8, 8)) and plan.runs("rtn", (4, 4))
    assert plan.runs("repq", (4, 4)) and not plan.runs("repq", (8, 8))
    assert plan.method_config("repq").reparam is False and plan.method_config("rtn") == RTNConfig()


def test_default_config_is_package_data_and_the_repository_file():
    shipped = Path(__file__).resolve().parents[1] / "configs" / "text-minilm-rt.toml"
    assert shipped.read_text() == default_config_text()
    assert load_config(None).raw == load_config(shipped).raw
