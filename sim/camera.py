"""A headless scene camera: pybullet's CPU renderer by default, EGL when asked and available."""

from __future__ import annotations

import logging
import pkgutil
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from learner.config import CameraConfig

log = logging.getLogger(__name__)


@dataclass
class Lighting:
    """Light parameters passed to the renderer; domain randomisation perturbs them."""

    direction: tuple[float, float, float] = (0.4, -0.3, 1.0)
    ambient: float = 0.6
    diffuse: float = 0.35
    specular: float = 0.05


@dataclass
class Camera:
    cfg: CameraConfig
    client: int
    lighting: Lighting = field(default_factory=Lighting)
    jitter: np.ndarray = field(default_factory=lambda: np.zeros(6))  # eye (3) + target (3) offsets, m
    renderer: int = p.ER_TINY_RENDERER

    def __post_init__(self) -> None:
        if self.cfg.renderer in ("egl", "auto"):
            if load_egl(self.client):
                self.renderer = p.ER_BULLET_HARDWARE_OPENGL
            elif self.cfg.renderer == "egl":
                raise RuntimeError("camera.renderer is 'egl' but pybullet's EGL plugin did not load; use 'tiny'")
        self._proj = p.computeProjectionMatrixFOV(
            self.cfg.fov_deg, self.cfg.width / self.cfg.height, self.cfg.near, self.cfg.far
        )

    def view_matrix(self, base_xy: tuple[float, float] = (0.0, 0.0)) -> list[float]:
        offset = np.array([base_xy[0], base_xy[1], 0.0]) if self.cfg.follow_base else np.zeros(3)
        eye = np.asarray(self.cfg.eye) + offset + self.jitter[:3]
        target = np.asarray(self.cfg.target) + offset + self.jitter[3:]
        return p.computeViewMatrix(eye.tolist(), target.tolist(), self.cfg.up)

    def render(
        self, base_xy: tuple[float, float] = (0.0, 0.0), size: tuple[int, int] | None = None
    ) -> np.ndarray:
        """An RGB uint8 image (H, W, 3); `size` = (width, height) overrides the config's."""
        width, height = size or (self.cfg.width, self.cfg.height)
        proj = self._proj
        if size is not None:
            proj = p.computeProjectionMatrixFOV(self.cfg.fov_deg, width / height, self.cfg.near, self.cfg.far)
        light = self.lighting
        _, _, rgba, _, _ = p.getCameraImage(
            width,
            height,
            self.view_matrix(base_xy),
            proj,
            lightDirection=list(light.direction),
            lightAmbientCoeff=light.ambient,
            lightDiffuseCoeff=light.diffuse,
            lightSpecularCoeff=light.specular,
            shadow=0,
            renderer=self.renderer,
            flags=p.ER_NO_SEGMENTATION_MASK,
            physicsClientId=self.client,
        )
        return np.asarray(rgba, dtype=np.uint8).reshape(height, width, 4)[:, :, :3].copy()


def load_egl(client: int) -> bool:
    """Load pybullet's EGL renderer plugin into `client`; False where it cannot load."""
    loader = pkgutil.get_loader("eglRenderer")
    if loader is None:
        return False
    try:
        plugin = p.loadPlugin(loader.get_filename(), "_eglRendererPlugin", physicsClientId=client)
    except p.error:
        return False
    if plugin < 0:
        log.info("EGL renderer unavailable; using the CPU renderer")
        return False
    return True
