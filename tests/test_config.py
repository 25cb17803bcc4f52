"""mfpipe.config: precedence of the four layers, `__` nesting, typed environment values, foreign MFPIPE_* ignored."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mfpipe.config import Config, load_config
from mfpipe.errors import MfpipeError


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mfpipe.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_then_file_then_environment_then_flags(tmp_path: Path) -> None:
    file = _toml(tmp_path, 'k = 5\nseed = 7\ndata = "from-file"\n[split]\nseed = 3\n')
    env = {"MFPIPE_K": "20", "MFPIPE_DATA": "from-env"}
    config = load_config(file, overrides={"data": "from-flag", "seed": None}, environ=env)
    assert config.data == "from-flag"  # flag over environment
    assert config.k == 20  # environment over file
    assert config.seed == 7 and config.split.seed == 3  # file over defaults; a None flag is "not given"
    assert config.promotion_rule == Config().promotion_rule  # defaults last


def test_environment_values_are_typed_like_their_fields() -> None:
    env = {
        "MFPIPE_K": "20",
        "MFPIPE_MODELS": "als,pop",
        "MFPIPE_SKIP_UNCHANGED": "true",
        "MFPIPE_TRAIN_TIMEOUT_SECONDS": "90.5",
        "MFPIPE_DATA_HOME": "/srv/cache",
        "MFPIPE_MODEL_PARAMS": '{"als": {"factors": 32}}',
    }
    config = load_config(environ=env)
    assert config.k == 20 and config.models == ["als", "pop"] and config.skip_unchanged is True
    assert config.train_timeout_seconds == 90.5 and config.data_home == Path("/srv/cache")
    assert config.model_params == {"als": {"factors": 32}}
    # What a deployment stores (a Prefect flow parameter): JSON types, not strings.
    dumped = config.model_dump(mode="json", exclude_unset=True)
    assert json.loads(json.dumps(dumped))["k"] == 20 and dumped["models"] == ["als", "pop"]


def test_nested_fields_use_a_double_underscore() -> None:
    env = {
        "MFPIPE_SPLIT__PROTOCOL": "random-per-user",
        "MFPIPE_SPLIT__SEED": "9",
        "MFPIPE_DATA_OPTIONS__SEP": ";",
        "MFPIPE_MODEL_PARAMS__BPR__EPOCHS": "3",
        "MFPIPE_MODEL_PARAMS__BPR__LOSS": "warp",
    }
    config = load_config(environ=env)
    assert (config.split.protocol, config.split.seed) == ("random-per-user", 9)
    assert config.split.cutoff_quantile == 0.8  # the section's other fields keep their defaults
    assert config.data_options.sep == ";"
    assert config.model_params == {"bpr": {"epochs": 3, "loss": "warp"}}


def test_the_environment_overrides_one_nested_field_of_the_file(tmp_path: Path) -> None:
    file = _toml(tmp_path, '[split]\nprotocol = "random-per-item"\nseed = 4\n')
    config = load_config(file, environ={"MFPIPE_SPLIT__SEED": "11"})
    assert (config.split.protocol, config.split.seed) == ("random-per-item", 11)


def test_undeclared_mfpipe_variables_are_left_alone() -> None:
    env = {
        "MFPIPE_CRON": "0 3 * * *",  # the compose worker's
        "MFPIPE_TIMEZONE": "UTC",
        "MFPIPE_PREFECT_PORT": "4300",  # the stack's published ports
        "MFPIPE_POSTGRES_PASSWORD": "secret",
        "MFPIPE_SPLIT__NOT_A_FIELD": "x",
        "MFPIPE_DATA__X": "1",  # `data` is a string, not a section
        "MFPIPE_DASK_ADDRESS": "",  # empty is unset
        "PATH": "/usr/bin",
    }
    config = load_config(environ=env)
    assert config.model_dump(exclude_unset=True) == {}
    assert config == load_config(environ={})


def test_only_what_a_layer_sets_counts_as_set(tmp_path: Path) -> None:
    file = _toml(tmp_path, 'registered_model = "m"\n')
    config = load_config(file, overrides={"models": "pop"}, environ={"MFPIPE_SPLIT__SEED": "1"})
    assert config.model_dump(mode="json", exclude_unset=True) == {
        "registered_model": "m",
        "models": ["pop"],
        "split": {"seed": 1},
    }


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"MFPIPE_K": "twenty"}, r"^MFPIPE_K: invalid config value for 'k': .*integer"),
        ({"MFPIPE_SPLIT__SEED": "x"}, r"^MFPIPE_SPLIT__SEED: invalid config value for 'split\.seed'"),
        ({"MFPIPE_MODELS": "als,nope"}, r"^MFPIPE_MODELS: invalid config value for 'models': .*model\(s\) nope"),
        ({"MFPIPE_MODEL_PARAMS": "{"}, r"^MFPIPE_MODEL_PARAMS: .* 'model_params': not valid JSON"),
    ],
)
def test_a_bad_environment_value_is_one_line_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(MfpipeError, match=message) as caught:
        load_config(environ=env)
    assert "\n" not in str(caught.value)


def test_a_bad_file_value_names_the_file_and_a_flag_wins_over_it(tmp_path: Path) -> None:
    file = _toml(tmp_path, "k = 0\n")
    with pytest.raises(MfpipeError, match=rf"^{file}: invalid config value for 'k'"):
        load_config(file, environ={})
    with pytest.raises(MfpipeError, match=r"^invalid config value for 'k'"):
        load_config(overrides={"k": 0}, environ={})
    assert load_config(file, overrides={"k": 3}, environ={}).k == 3


def test_the_process_environment_is_read_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MFPIPE_K", "15")
    monkeypatch.setenv("MFPIPE_CRON", "*/5 * * * *")
    assert load_config().k == 15


def test_constructing_config_never_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Config` is a Prefect flow parameter: a worker must run what was deployed, not its own MFPIPE_*."""
    monkeypatch.setenv("MFPIPE_K", "15")
    assert Config().k == 10 and Config.model_validate({"seed": 1}).k == 10
