"""The robot interface's specs, and render proxies that change rendering but not physics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pybullet as p
import pytest

from core.interface import ArraySpec, DiscreteSpec, Robot, flag_specs
from sim.assets import asset, render_proxy


def test_array_spec_checks_shape_dtype_and_bounds() -> None:
    spec = ArraySpec((2,), np.float32, -1.0, 1.0, "rad", ("a", "b"))
    assert spec.contains(np.array([0.5, -1.0], np.float32))
    assert not spec.contains(np.array([0.5, -1.5], np.float32))
    assert spec.contains(np.array([0.5, -1.005], np.float32), atol=0.01)
    assert not spec.contains(np.array([0.5, 0.5], np.float64))
    assert not spec.contains(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="3 names"):
        ArraySpec((2,), np.float32, names=("a", "b", "c"))


def test_discrete_spec() -> None:
    spec = DiscreteSpec(3, ("left", "right", "grip"))
    assert spec.contains(2) and spec.contains(np.int64(0))
    assert not spec.contains(3) and not spec.contains(1.5) and not spec.contains(np.array([1, 2]))
    with pytest.raises(ValueError):
        DiscreteSpec(2, ("only one",))


def test_flags_are_scalars() -> None:
    specs = flag_specs()
    assert list(specs) == ["reward", "is_first", "is_last", "is_terminal"]
    assert all(s.shape == () for s in specs.values())


def test_robot_is_abstract() -> None:
    with pytest.raises(TypeError):
        Robot()  # type: ignore[abstract]


@pytest.mark.parametrize("urdf", ["xarm/xarm6_robot.urdf", "a1/a1.urdf", "franka_panda/panda.urdf"])
def test_render_proxy_keeps_physics(urdf: str) -> None:
    client = p.connect(p.DIRECT)
    try:
        kw = {"useFixedBase": True, "physicsClientId": client}
        a = p.loadURDF(asset(urdf), **kw)
        b = p.loadURDF(render_proxy(urdf), **kw)
        n = p.getNumJoints(a, physicsClientId=client)
        assert n == p.getNumJoints(b, physicsClientId=client) > 0
        for link in range(-1, n):
            da = p.getDynamicsInfo(a, link, physicsClientId=client)
            db = p.getDynamicsInfo(b, link, physicsClientId=client)
            # mass, friction, inertia diagonal, inertial position
            np.testing.assert_allclose(np.hstack(da[:4]), np.hstack(db[:4]))
        for j in range(n):
            ja = p.getJointInfo(a, j, physicsClientId=client)
            jb = p.getJointInfo(b, j, physicsClientId=client)
            assert ja[1:4] == jb[1:4] and ja[8:12] == jb[8:12]
        visual_a = {v[4] for v in p.getVisualShapeData(a, physicsClientId=client)}
        visual_b = {v[4] for v in p.getVisualShapeData(b, physicsClientId=client)}
        assert visual_a != visual_b  # the proxy draws other (collision) geometry
    finally:
        p.disconnect(client)


def test_missing_asset_is_named() -> None:
    with pytest.raises(FileNotFoundError, match="no_such/robot.urdf"):
        asset("no_such/robot.urdf")


def test_render_proxy_cache_from_a_vanished_install_is_rebuilt(tmp_path, monkeypatch) -> None:
    """Cached proxies embed absolute mesh paths of the pybullet_data that made them. A cache made by
    another install (another clone's venv, since removed) must not break this one's ArmReach."""
    from sim import assets
    from sim.arm_reach import ArmReach
    from sim.tasks import default_config

    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path / "cache"))
    other = tmp_path / "other-venv" / "pybullet_data"
    other.mkdir(parents=True)
    (other / "xarm").symlink_to(assets.DATA / "xarm", target_is_directory=True)
    monkeypatch.setattr(assets, "DATA", other)
    assets.render_proxy.cache_clear()
    stale = assets.render_proxy("xarm/xarm6_robot.urdf")  # the other install fills the shared cache
    assert str(other) in Path(stale).read_text()
    (other / "xarm").unlink()  # ... and goes away
    monkeypatch.undo()
    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path / "cache"))
    assets.render_proxy.cache_clear()
    try:
        with ArmReach(default_config("arm_reach", ["camera.enabled=false"])) as robot:
            robot.reset(seed=0)
    finally:
        assets.render_proxy.cache_clear()


def test_render_proxy_with_missing_meshes_is_regenerated(tmp_path, monkeypatch) -> None:
    """Whatever the key, a cached proxy whose meshes are gone is written again, not loaded."""
    from sim import assets

    monkeypatch.setenv("REVERIE_CACHE", str(tmp_path))
    assets.render_proxy.cache_clear()
    try:
        path = Path(assets.render_proxy("xarm/xarm6_robot.urdf"))
        source = Path(assets.asset("xarm/xarm6_robot.urdf"))
        path.write_text(assets.make_render_proxy(source.read_text(), tmp_path / "gone" / "xarm"))
        assets.render_proxy.cache_clear()
        again = Path(assets.render_proxy("xarm/xarm6_robot.urdf"))
        assert "gone" not in again.read_text()
        client = p.connect(p.DIRECT)
        try:
            p.loadURDF(str(again), useFixedBase=True, physicsClientId=client)
        finally:
            p.disconnect(client)
    finally:
        assets.render_proxy.cache_clear()
