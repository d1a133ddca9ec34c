"""Configuration: every shipped file loads, and every kind of mistake gets a precise message."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from core.config import TASK_BLOCKS, Config, ConfigError, load_config, parse_overrides, write_resolved

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "hardware_configs").glob("*.yaml"))
ROBOT_CONFIG = CONFIGS[0].parent / "koch_arm.yaml"  # a task config with every block a robot has


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
    assert "control.hz: expected a value greater than or equal to 0.1, found -5" in msg


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


@pytest.mark.parametrize("camera,expected", [
    ("max_age_ms: 3000", "sensors.camera.max_age_ms: expected a value below dead_after_s (2000 ms)"),
    ("max_age_ms: 3000, dead_after_s: 3", "sensors.camera.max_age_ms: expected a value below dead_after_s (3000 ms)"),
    ("dead_after_s: 61", "sensors.camera.dead_after_s: expected a value less than or equal to 60"),
    ("dead_after_s: 0", "sensors.camera.dead_after_s: expected a value greater than 0"),
])
def test_a_camera_is_stale_before_it_is_dead(tmp_path: Path, camera: str, expected: str) -> None:
    # The reader calls a camera dead first: a stale limit at or past the dead time never applied.
    head = "name: r\ntask: arm_reach\nsensors: {camera: {device: /dev/video0, "
    msg = _error(_write(tmp_path, head + camera + "}}\n"))
    assert expected in msg, msg
    cfg = load_config(_write(tmp_path, head + "max_age_ms: 3000, dead_after_s: 30}}\n"))
    assert cfg.sensors.camera is not None and cfg.sensors.camera.dead_after_s == 30


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
    cfg = load_config(ROBOT_CONFIG, ["control.hz=5", "camera.eye=[1, 2, 3]", "randomization.colors=true"])
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
    cfg = load_config(ROBOT_CONFIG)
    with pytest.raises(Exception):  # noqa: B017 - pydantic raises its own ValidationError
        cfg.control.hz = 3  # type: ignore[misc]


def test_resolved_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROBOT_CONFIG, ["control.hz=5"])
    out = write_resolved(cfg, tmp_path / "run")
    assert out == tmp_path / "run" / "config.yaml"
    data = yaml.safe_load(out.read_text())
    assert set(data) & set(TASK_BLOCKS) == {cfg.task}
    again = load_config(out)
    assert again.to_dict() == cfg.to_dict()  # unused task blocks are not written, so compare what is
    assert isinstance(again, Config)


def test_configuration_reference_is_current() -> None:
    """docs/configuration.md is generated from the schema; regenerate it when the schema changes."""
    from core.config.doc import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
    assert doc.read_text() == render(), "run: python -m core.config.doc > docs/configuration.md"


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # YAML 1.1 reads 3e-4 as a string; learning rates are written that way all the time.
    cfg = load_config(_write(tmp_path, "name: r\ntask: arm_reach\ndreamer: {lr: 3e-4}\n"), ["dreamer.ac_lr=1e-4"])
    assert cfg.dreamer.lr == 3e-4 and cfg.dreamer.ac_lr == 1e-4


@pytest.mark.parametrize("key,value,expected", [
    ("size", "size7m", "'size1m'"),
    ("size", "[1]", "found [1]"),
    ("recipe", "2022", "'2024', '2023', 'v1' or 'v2'"),
    ("recipe", "{a: 1}", "found {'a': 1}"),
    ("budget", "tiny", "'faithful' or 'small'"),
    ("budget", "[1]", "found [1]"),
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


# --- issue 20: values that used to be accepted (or crash the loader) -----------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("control: {hz: 1e-300}", "control.hz: expected a value greater than or equal to 0.1, found 1e-300"),
    ("control: {hz: .nan}", "control.hz: expected a finite number, found nan"),
    ("control: {status_every_s: .inf}", "control.status_every_s: expected a finite number, found inf"),
    ("link: {spool_max_mb: .inf}", "link.spool_max_mb: expected a finite number, found inf"),
    ("seed: 1180591620717411303424", "seed: expected a value less than or equal to 4294967295"),
    ("link: {robot_id: 'arm 1'}", "link.robot_id: expected 1..64 of letters, digits, '_', '.', '-', found 'arm 1'"),
    ("link: {robot_id: ''}", "link.robot_id: expected 1..64 of letters, digits"),
])
def test_values_that_would_run_forever_or_crash_later_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    # control.hz 1e-300 is one step per 1e300 s: the robot ran forever; a seed of 2**70 crashed torch's seeding;
    # an infinite spool limit overflowed int(); a robot id with a space crashed the link after the motors started.
    msg = _error(_write(tmp_path, f"name: r\ntask: arm_reach\n{text}\n"))
    assert expected in msg, msg
    assert len(msg.splitlines()) == 2, msg  # the file line and this one problem


def test_the_config_robot_id_rule_is_the_wire_protocols() -> None:
    from core.config.link import ROBOT_ID_PATTERN
    from core.link.protocol import ID_RE

    assert ID_RE.pattern == ROBOT_ID_PATTERN


@pytest.mark.parametrize("text,line,first", [
    ("name: r\ntask: arm_reach\ncontrol: {hz: 10}\ncontrol: {hz: 20}\n", 4, 3),
    ("name: r\ntask: arm_reach\ncontrol:\n  hz: 10\n  episode_steps: 50\n  hz: 20\n", 6, 4),
])
def test_a_duplicated_key_is_an_error_naming_key_and_lines(tmp_path: Path, text: str, line: int, first: int) -> None:
    # YAML lets the second block silently replace the first: a config that says two things means neither.
    path = _write(tmp_path, text)
    msg = _error(path)
    key = "control" if line == 4 else "hz"
    assert str(path) in msg and f"line {line}, column" in msg, msg
    assert f"duplicate key {key!r} (first at line {first}" in msg, msg


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = "name: r\ntask: arm_reach\nbase: &b {hz: 10, episode_steps: 50}\ncontrol: {<<: *b, hz: 20}\n"
    msg = _error(_write(tmp_path, text))
    assert "base: unknown key" in msg and "duplicate" not in msg  # the merge itself is fine


def test_a_config_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    path = tmp_path / "robot.yaml"
    raw = b"name: r\ntask: arm_reach\ncontrol: {hz: 1\xff}\n"
    path.write_bytes(raw)
    msg = _error(path)
    assert str(path) in msg and f"line 3: not UTF-8 text (byte 0xff at offset {raw.index(0xff)})" in msg, msg


@pytest.mark.parametrize("depth", [40, 5000])
def test_deeply_nested_yaml_is_refused_not_a_recursion_crash(tmp_path: Path, depth: int) -> None:
    path = _write(tmp_path, "name: r\ntask: arm_reach\nsim: " + "[" * depth + "]" * depth + "\n")
    msg = _error(path)
    assert str(path) in msg and "line 3, column 21: nested more than 16 levels deep" in msg, msg
    assert len(msg) < 300


def test_deeply_nested_override_is_refused(tmp_path: Path) -> None:
    msg = _error(_write(tmp_path, "name: r\ntask: arm_reach\n"), ["sim=" + "[" * 5000 + "]" * 5000])
    assert "--set" in msg and "sim: " in msg and "nested more than 16 levels deep" in msg, msg
    assert len(msg) < 300


def test_default_spool_is_in_the_users_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Not the working directory: a robot started from elsewhere must find its unsent experience again.
    from core.config.link import default_spool_dir

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_spool_dir("arm1") == tmp_path / "state" / "reverie" / "spool" / "arm1"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for unusable in ("", "relative/state"):  # the XDG spec: a relative path is to be ignored
        monkeypatch.setenv("XDG_STATE_HOME", unusable)
        assert default_spool_dir("arm1") == tmp_path / "home" / ".local" / "state" / "reverie" / "spool" / "arm1"


def test_secrets_and_robot_state_are_ignored_by_git() -> None:
    # `git add -A` in a checkout used to commit CURVE secret keys, calibrations, spooled experience and the
    # config files the viewer writes next to its videos.
    import shutil
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if shutil.which("git") is None or not (root / ".git").exists():
        pytest.skip("not a git checkout")
    paths = ["keys/arm1.key_secret", "keys/learner.key", "calibration/so101_arm.json", "spool/arm1/next_seq",
             "run.mp4.config.yaml", "videos/run.gif.config.yaml"]
    result = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=root, capture_output=True, text=True)
    assert sorted(result.stdout.split()) == sorted(paths), result.stdout + result.stderr


def test_every_task_in_the_table_has_its_block_and_its_code() -> None:
    """The task table drives the rest: a task's settings block is the Config field of its name, and the
    code it names (robot, real task, scripted controller) exists."""
    from core.config.tasks import MARKER_TASKS, SERVO_TASKS, SIM_TASKS, TASKS, load

    assert set(SIM_TASKS) | set(SERVO_TASKS) == set(TASKS) and set(MARKER_TASKS) <= set(SERVO_TASKS)
    for name, spec in TASKS.items():
        assert name in Config.model_fields, name
        assert callable(load(spec.factory)), spec.factory
        if spec.backend == "sim":
            assert spec.gym_id and (CONFIGS[0].parent / spec.default_config).is_file(), name
        assert spec.scripted is None or callable(load(spec.scripted)), spec.scripted
