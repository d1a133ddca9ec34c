"""Configuration: every shipped file loads, and every kind of mistake gets a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from learner.config import TASK_BLOCKS, Config, ConfigError, load_config, parse_overrides, write_resolved

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "hardware_configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "robot.yaml"
    path.write_text(text)
    return path


def _error(path: Path, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides or [])
    return str(info.value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.substeps >= 1


def test_sim_task_configs_exist() -> None:
    names = {p.name for p in CONFIGS}
    assert {"sim_arm_reach.yaml", "sim_arm_pick.yaml", "sim_quadruped_walk.yaml"} <= names


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    msg = _error(tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "file not found" in msg


def test_unknown_key_names_path_and_allowed_keys(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {hz: 10, hzz: 5}\n")
    msg = _error(path)
    assert str(path) in msg
    assert "control.hzz: unknown key" in msg
    assert "episode_steps, hz" in msg


def test_wrong_type_says_expected_and_found(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {episode_steps: '100'}\n"))
    assert "control.episode_steps: expected a valid integer, found '100'" in msg


def test_bool_is_not_a_number(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {hz: true}\n"))
    assert "control.hz" in msg and "found True" in msg


def test_out_of_range_value(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {hz: -5}\n"))
    assert "control.hz: expected a value greater than 0, found -5" in msg


def test_bad_choice_lists_choices(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\narm_reach: {action_mode: polar}\n"))
    assert "arm_reach.action_mode: expected 'joint' or 'cartesian', found 'polar'" in msg


def test_missing_required_key(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "task: arm_reach\n"))
    assert "name: missing required key" in msg
    msg = _error(_write(tmp_path, "name: r\n"))
    assert "task: expected a simulated task, one of" in msg and "(backend sim)" in msg
    msg = _error(_write(tmp_path, "name: r\nbackend: gym\n"))
    assert "gym_id: expected a Gymnasium id" in msg


def test_wrong_vector_length_names_index_free_path(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncamera: {eye: [1, 2]}\n"))
    assert "camera.eye: expected a list of at least 3 items, found [1, 2]" in msg


def test_element_type_error_names_the_index(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncamera: {eye: [1, x, 2]}\n"))
    assert "camera.eye[1]" in msg


def test_cross_field_check_points_at_the_key(tmp_path: Path) -> None:
    text = "name: r\ntask: arm_reach\narm_reach: {target_low: [0.6, 0, 0], target_high: [0.5, 0.2, 0.3]}\n"
    msg = _error(_write(tmp_path, text))
    assert "arm_reach.target_low: expected every element <=" in msg


def test_physics_rate_must_be_a_multiple_of_control_rate(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {hz: 7}\nsim: {physics_hz: 240}\n"))
    assert "sim.physics_hz: expected a whole multiple" in msg


def test_yaml_syntax_error_gives_line(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: [arm_reach\n"))
    assert str(tmp_path) in msg and "line" in msg and "not valid YAML" in msg


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "- a\n- b\n"))
    assert "expected a mapping of blocks, found list" in msg


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(_write(tmp_path, "name: r\ntask: arm_reach\ncontrol: {hz: 0, episode_steps: 0}\n"))
    assert len(info.value.problems) == 2


def test_overrides_apply_with_dotted_keys() -> None:
    cfg = load_config(CONFIGS[0], ["control.hz=5", "camera.eye=[1, 2, 3]", "randomization.colors=true"])
    assert cfg.control.hz == 5.0
    assert cfg.camera.eye == [1.0, 2.0, 3.0]
    assert cfg.randomization.colors is True


def test_override_errors_name_the_override(tmp_path: Path) -> None:
    path = _write(tmp_path, "name: r\ntask: arm_reach\n")
    msg = _error(path, ["control.hz=fast"])
    assert "control.hz: expected a valid number, found 'fast'" in msg
    assert "--set control.hz=fast" in msg
    msg = _error(path, ["control.speed=3"])
    assert "control.speed: unknown key" in msg and "--set control.speed=3" in msg


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_overrides(["control.hz"])
    with pytest.raises(ConfigError, match="expected KEY.PATH=VALUE"):
        parse_overrides(["control..hz=3"])


def test_override_into_a_value_is_rejected(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\n"), ["name.first=3"])
    assert "name is a value" in msg


def test_config_is_immutable() -> None:
    cfg = load_config(CONFIGS[0])
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        cfg.control.hz = 3  # type: ignore[misc]


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS[0], ["control.hz=5"])
    out = write_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(out.read_text())
    assert set(data) & set(TASK_BLOCKS) == {cfg.task}
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()  # unused task blocks are not written, so compare what is
    assert isinstance(again, Config)


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the schema; regenerate it when the schema changes."""
    from learner.config_doc import render

    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "run: python -m learner.config_doc > docs/configuration.md"


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 3e-4 as a string; learning rates are written that way all the time.
    cfg = load_config(_write(tmp_path, "name: r\ntask: arm_reach\ndreamer: {lr: 3e-4}\n"), ["dreamer.ac_lr=1e-4"])
    assert cfg.dreamer.lr == 3e-4 and cfg.dreamer.ac_lr == 1e-4


@pytest.mark.parametrize("key,value,expected", [
    ("size", "size7m", "'size1m'"),
    ("size", "[1]", "found [1]"),
    ("recipe", "2022", "'2024' or '2023'"),
    ("recipe", "{a: 1}", "found {'a': 1}"),
])
def test_unknown_preset_name_is_the_only_error(tmp_path: Path, key: str, value: str, expected: str) -> None:
    # The presets fill the dimensions: a bad name (or a list/mapping where a name belongs) must be
    # reported as itself, not as a crash or a missing key for every value it would have filled.
    msg = _error(_write(tmp_path, f"name: r\ntask: arm_reach\ndreamer: {{{key}: {value}}}\n"))
    assert f"dreamer.{key}: expected" in msg and expected in msg
    assert "missing required key" not in msg


@pytest.mark.parametrize("key,value,expected", [
    ("bind", "tcp://127.0.0.1:99999", "with PORT in 1..65535"),  # zmq would quietly bind another port
    ("bind", "nonsense", "tcp://HOST:PORT (HOST and PORT may be *) or ipc://PATH"),
    ("learner", "tcp://*:5555", "* only in a learner's bind address"),
    ("learner", "tcp://10.0.0.2", "tcp://HOST:PORT or ipc://PATH"),
    ("allow_dir", None, "set together with link.server_secret"),
])
def test_link_errors_name_the_key_once(tmp_path: Path, key: str, value: str | None, expected: str) -> None:
    link = {key: value} if value is not None else {"server_secret": "learner.key_secret"}
    text = yaml.safe_dump({"name": "r", "task": "arm_reach", "link": link})
    msg = _error(_write(tmp_path, text))
    assert f"- link.{key}: expected" in msg and expected in msg and "link.link" not in msg, msg


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://[::1]:5555", "tcp://robot.local:1",
                                     "tcp://10.0.0.1;10.0.0.2:5555", "ipc:///tmp/reverie.sock"])
def test_usable_link_addresses_load(tmp_path: Path, address: str) -> None:
    text = yaml.safe_dump({"name": "r", "task": "arm_reach", "link": {"bind": address, "learner": address}})
    assert load_config(_write(tmp_path, text)).link.learner == address
