"""The application's configuration: shipped YAML files parse, and hostile values give clean errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flatlora_dist import FlatLoRAConfig
from flatlora_dist.train.config import ConfigError, TrainConfig, load_yaml, parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", sorted((REPO / "launch" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_parse(path):
    cfg = parse_args(["--config", str(path)])
    assert isinstance(cfg, TrainConfig)
    assert set(load_yaml(str(path))) <= set(cfg.to_dict())


def test_defaults_are_the_demo():
    demo = parse_args(["--config", str(REPO / "launch" / "configs" / "demo.yaml")])
    default = parse_args([])
    assert demo.to_dict() == default.to_dict()


def test_cli_overrides_yaml_and_launcher_args_are_ignored(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("sigma: 0.2\nmax_steps: 7\n")
    cfg = parse_args(["--local_rank=1", "--config", str(f), "--sigma", "0.1", "--deepspeed", "ds.json"])
    assert cfg.sigma == 0.1 and cfg.max_steps == 7 and cfg.ds_config == "ds.json"


@pytest.mark.parametrize(
    "text,message",
    [
        ("sigmaa: 0.1\n", "did you mean 'sigma'"),
        ("- a\n- b\n", "mapping"),
        ("sigma: [1, 2]\n", "expects float"),
        ("max_steps: 1.5\n", "expects int"),
        ("a: b: c\n", "line 1"),
        ("bf16: maybe\n", "expects bool"),
    ],
)
def test_bad_yaml_gives_one_line(tmp_path, text, message):
    f = tmp_path / "c.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=message) as e:
        parse_args(["--config", str(f)])
    assert "\n" not in str(e.value)


def test_missing_and_binary_config(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "nope.yaml")])
    b = tmp_path / "b.yaml"
    b.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError):
        parse_args(["--config", str(b)])


_values = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=20), st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(), max_size=2))  # fmt: skip
_keys = st.sampled_from(sorted(TrainConfig().to_dict()) + ["bogus", "sigmaa", "local_rank"])


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=6))
def test_any_yaml_mapping_parses_or_fails_cleanly(tmp_path_factory, mapping):
    import yaml

    f = tmp_path_factory.mktemp("h") / "c.yaml"
    f.write_text(yaml.safe_dump(mapping))
    try:
        parse_args(["--config", str(f)])
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@settings(max_examples=300, deadline=None)
@given(
    sigma=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=3), st.none()),
    total=st.one_of(st.none(), st.integers(-5, 10**9), st.floats(), st.booleans()),
    schedule=st.one_of(st.sampled_from(["cosine", "constant"]), st.text(max_size=8)),
    seed=st.one_of(st.integers(-5, 2**70), st.floats(), st.text(max_size=2)),
    mode=st.one_of(st.sampled_from(["auto", "inplace", "functional"]), st.text(max_size=8)),
)
def test_flatlora_config_accepts_good_values_and_names_bad_ones(sigma, total, schedule, seed, mode):
    try:
        cfg = FlatLoRAConfig(sigma=sigma, total_steps=total, schedule=schedule, seed=seed, mode=mode)
    except ValueError as e:
        assert any(k in str(e) for k in ("sigma", "total_steps", "schedule", "seed", "mode"))
        return
    assert cfg.sigma >= 0 and cfg.schedule in ("cosine", "constant") and cfg.mode in ("auto", "inplace", "functional")
