"""The robot interface's specs, and render proxies that change rendering but not physics."""

from __future__ import annotations

import numpy as np
import pybullet as p
import pytest

from robot.interface import ArraySpec, DiscreteSpec, Robot, flag_specs
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
