"""Domain randomisation hooks: colours, lighting, camera pose jitter, friction and masses.

All draws come from the episode's generator, so a seed fixes them. The nominal values are read
once when the scene is built, so repeated episodes scale from nominal, never compound.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pybullet as p

from core.config import RandomizationConfig
from sim.camera import Camera, Lighting


@dataclass(frozen=True)
class LinkDynamics:
    body: int
    link: int
    mass: float
    friction: float


def nominal_dynamics(client: int, bodies: list[int]) -> list[LinkDynamics]:
    out = []
    for body in bodies:
        for link in range(-1, p.getNumJoints(body, physicsClientId=client)):
            info = p.getDynamicsInfo(body, link, physicsClientId=client)
            out.append(LinkDynamics(body, link, mass=info[0], friction=info[1]))
    return out


class Randomizer:
    """Applies the configured randomisation to a scene at each reset."""

    def __init__(self, cfg: RandomizationConfig, client: int, bodies: list[int]) -> None:
        self.cfg = cfg
        self.client = client
        self.bodies = bodies
        self.nominal = nominal_dynamics(client, bodies)

    @property
    def active(self) -> bool:
        c = self.cfg
        return (
            c.colors
            or c.lighting
            or c.camera_jitter > 0
            or c.friction != [1.0, 1.0]
            or c.mass_scale != [1.0, 1.0]
        )

    def apply(self, rng: np.random.Generator, camera: Camera) -> None:
        c = self.cfg
        if c.friction != [1.0, 1.0] or c.mass_scale != [1.0, 1.0]:
            for d in self.nominal:
                kwargs = {"lateralFriction": d.friction * rng.uniform(*c.friction)}
                if d.mass > 0:  # mass 0 means static; scaling it would make it dynamic
                    kwargs["mass"] = d.mass * rng.uniform(*c.mass_scale)
                p.changeDynamics(d.body, d.link, physicsClientId=self.client, **kwargs)
        if c.colors:
            for d in self.nominal:
                rgba = [*rng.uniform(0.1, 0.95, size=3).tolist(), 1.0]
                p.changeVisualShape(d.body, d.link, rgbaColor=rgba, physicsClientId=self.client)
        if c.lighting:
            direction = rng.normal(size=3)
            direction[2] = abs(direction[2]) + 0.5  # light from above the scene
            camera.lighting = Lighting(
                direction=tuple(direction.tolist()),
                ambient=float(rng.uniform(0.4, 0.8)),
                diffuse=float(rng.uniform(0.2, 0.5)),
                specular=float(rng.uniform(0.0, 0.2)),
            )
        if c.camera_jitter > 0:
            camera.jitter = rng.normal(scale=c.camera_jitter, size=6)
