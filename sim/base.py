"""What every simulated task shares: a private pybullet world, seeding, episode bookkeeping,
the scene camera, domain randomisation and the robot interface around them.

A task subclass builds its scene and says how an action moves the world, what the sensors read
and what the reward is; this class turns that into `reset`/`send`/`observe` with correct flags.
"""

from __future__ import annotations

import abc
from typing import Any

import numpy as np
import pybullet as p

from core.config import Config
from core.interface import ArraySpec, DiscreteSpec, Robot, RobotError, flag_specs
from core.layout import BOOL_FLAGS
from sim.camera import Camera
from sim.randomization import Randomizer


class SimRobot(Robot):
    """Base of the PyBullet tasks. Subclasses implement the abstract hooks below."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.client = p.connect(p.DIRECT)
        self.rng = np.random.default_rng(cfg.seed)
        self.info: dict[str, Any] = {}
        self._steps = 0
        self._flags = {"reward": 0.0, "is_first": False, "is_last": True, "is_terminal": False}
        self._started = False
        try:
            p.setTimeStep(1.0 / cfg.sim.physics_hz, physicsClientId=self.client)
            p.setGravity(0, 0, -9.81, physicsClientId=self.client)
            # Solve contacts in a fixed order, not the broadphase's history-dependent one, so that an
            # episode after `restore_initial_state` replays exactly whatever ran before it.
            p.setPhysicsEngineParameter(deterministicOverlappingPairs=1, physicsClientId=self.client)
            self.camera = Camera(cfg.camera, self.client)
            self.build_scene()
            self.randomizer = Randomizer(cfg.randomization, self.client, self.randomized_bodies())
            self._initial_state = p.saveState(physicsClientId=self.client)
            self.action_spec = self.make_action_spec()
            self.observation_spec = self._make_observation_spec()
        except BaseException:
            p.disconnect(self.client)
            raise

    # ----- hooks for tasks -------------------------------------------------------------------
    @abc.abstractmethod
    def build_scene(self) -> None:
        """Load the robot and objects into `self.client` (called once)."""

    @abc.abstractmethod
    def make_action_spec(self) -> ArraySpec | DiscreteSpec: ...

    @abc.abstractmethod
    def proprio_spec(self) -> dict[str, ArraySpec]:
        """Specs of the non-image, non-flag observation entries."""

    @abc.abstractmethod
    def reset_task(self) -> None:
        """Put robot and objects in an episode's initial state, drawing from `self.rng`."""

    @abc.abstractmethod
    def apply_action(self, action: np.ndarray | int) -> None:
        """Command the (validated) action and advance physics by one control period."""

    @abc.abstractmethod
    def read_proprio(self) -> dict[str, np.ndarray]: ...

    @abc.abstractmethod
    def evaluate(self) -> tuple[float, bool, dict[str, Any]]:
        """(reward, terminal, info) for the transition that just happened."""

    def randomized_bodies(self) -> list[int]:
        """Bodies whose colours, friction and masses domain randomisation may change."""
        return []

    def camera_base_xy(self) -> tuple[float, float]:
        """Point the camera follows when `camera.follow_base` is set."""
        return (0.0, 0.0)

    # ----- the robot interface ----------------------------------------------------------------
    def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.randomizer.apply(self.rng, self.camera)
        self.reset_task()
        self._steps = 0
        self._started = True
        self.info = {}
        self._flags = {"reward": 0.0, "is_first": True, "is_last": False, "is_terminal": False}
        return self.observe()

    def send(self, action: np.ndarray | int) -> None:
        if not self._started:
            raise RobotError(f"{type(self).__name__}: send() before reset()")
        if self._flags["is_last"]:
            raise RobotError(f"{type(self).__name__}: the episode has ended (is_last); call reset()")
        self.apply_action(self._validate(action))
        reward, terminal, info = self.evaluate()
        self._steps += 1
        self.info = info
        self._flags = {
            "reward": float(reward),
            "is_first": False,
            "is_last": bool(terminal or self._steps >= self.cfg.control.episode_steps),
            "is_terminal": bool(terminal),
        }

    def observe(self) -> dict[str, np.ndarray]:
        obs = dict(self.read_proprio())
        if "image" in self.observation_spec:
            obs["image"] = self.camera.render(self.camera_base_xy())
        obs["reward"] = np.float32(self._flags["reward"])
        for key in BOOL_FLAGS:
            obs[key] = np.bool_(self._flags[key])
        return obs

    def stop(self) -> None:
        """Nothing moves a simulated robot between control steps, so stopping is holding still."""

    def close(self) -> None:
        if self.client >= 0 and p.isConnected(self.client):
            p.disconnect(self.client)
        self.client = -1

    # ----- helpers ------------------------------------------------------------------------------
    def render_frame(self, width: int = 256, height: int = 256) -> np.ndarray:
        """A larger view of the scene, for videos; does not affect observations."""
        return self.camera.render(self.camera_base_xy(), size=(width, height))

    def restore_initial_state(self) -> None:
        """Return the world to the state right after `build_scene` (a teleport)."""
        p.restoreState(self._initial_state, physicsClientId=self.client)

    @property
    def steps(self) -> int:
        return self._steps

    def _make_observation_spec(self) -> dict[str, ArraySpec]:
        spec: dict[str, ArraySpec] = {}
        if self.cfg.camera.enabled:
            spec["image"] = ArraySpec(
                (self.cfg.camera.height, self.cfg.camera.width, 3), np.uint8, 0, 255, "RGB", (), "scene camera"
            )
        spec.update(self.proprio_spec())
        spec.update(flag_specs())
        return spec

    def _validate(self, action: np.ndarray | int) -> np.ndarray | int:
        spec = self.action_spec
        if isinstance(spec, DiscreteSpec):
            if not spec.contains(action):
                raise RobotError(f"action {action!r} is not one of 0..{spec.n - 1}")
            return int(action)
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape != spec.shape:
            raise RobotError(f"action has shape {arr.shape}, expected {spec.shape}")
        if not np.all(np.isfinite(arr)):
            raise RobotError(f"action contains non-finite values: {arr.tolist()}")
        return np.clip(arr, spec.low, spec.high)
