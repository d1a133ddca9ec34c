"""A headless scene camera: pybullet's CPU renderer by default, EGL when asked and available."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pkgutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pybullet as p

from core.config import CameraConfig

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
            if load_egl(self.client, require_hardware=self.cfg.renderer == "auto"):
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
        self,
        base_xy: tuple[float, float] = (0.0, 0.0),
        size: tuple[int, int] | None = None,
        view: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> np.ndarray:
        """An RGB uint8 image (H, W, 3); `size` = (width, height) overrides the config's, `view` = (eye,
        target) its placement (a video's scene view, unjittered, need not be the policy's camera)."""
        width, height = size or (self.cfg.width, self.cfg.height)
        proj = self._proj
        if size is not None:
            proj = p.computeProjectionMatrixFOV(self.cfg.fov_deg, width / height, self.cfg.near, self.cfg.far)
        matrix = self.view_matrix(base_xy) if view is None else p.computeViewMatrix(*map(list, view), self.cfg.up)
        light = self.lighting
        _, _, rgba, _, _ = p.getCameraImage(
            width,
            height,
            matrix,
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


@contextlib.contextmanager
def _captured_stdout() -> Iterator[list[str]]:
    """Capture what C code writes to file descriptor 1 (pybullet's plugins print there)."""
    out: list[str] = []
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 1)
        try:
            yield out
        finally:
            os.dup2(saved, 1)
            os.close(saved)
            tmp.seek(0)
            out.append(tmp.read().decode(errors="replace"))


SOFTWARE_GL = ("llvmpipe", "softpipe", "swrast")


def _load_plugin(client: int) -> tuple[int, str]:
    """Load the EGL plugin into `client`; (plugin id or -1, the GL renderer it reported)."""
    loader = pkgutil.get_loader("eglRenderer")
    if loader is None:
        return -1, ""
    with _captured_stdout() as printed:
        try:
            plugin = p.loadPlugin(loader.get_filename(), "_eglRendererPlugin", physicsClientId=client)
        except p.error:
            plugin = -1
    text = printed[0] if printed else ""
    gl = next((line.split("=", 1)[1].strip() for line in text.splitlines() if line.startswith("GL_RENDERER")), "")
    return plugin, gl


@functools.cache
def egl_is_hardware() -> bool:
    """Probe once per process, in a throwaway client, whether EGL has a GPU behind it."""
    probe = p.connect(p.DIRECT)
    try:
        plugin, gl = _load_plugin(probe)
    finally:
        with _captured_stdout():
            p.disconnect(probe)
    if plugin < 0:
        log.info("EGL renderer unavailable; using the CPU renderer")
        return False
    if any(name in gl for name in SOFTWARE_GL):
        log.info("EGL renders with software OpenGL (%s); the CPU renderer is faster", gl)
        return False
    return True


def load_egl(client: int, require_hardware: bool = False) -> bool:
    """Load pybullet's EGL renderer plugin into `client`; False where it cannot load.

    With `require_hardware`, a software OpenGL (Mesa llvmpipe) is refused: on a CPU it renders
    several times slower than pybullet's own renderer.
    """
    if require_hardware and not egl_is_hardware():
        return False
    plugin, gl = _load_plugin(client)
    if plugin < 0:
        return False
    log.info("EGL renderer loaded (%s)", gl or "unknown GL")
    return True
