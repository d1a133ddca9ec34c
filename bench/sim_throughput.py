"""Simulation throughput: policy steps/s per task with and without images, beside the raw
`stepSimulation` and 64×64 render rates of the same scene. Prints one JSON document.

Targets (issue 2): ArmReach with 64×64 images >= 200 policy steps/s on one core;
QuadrupedWalk (50 substeps per step, no image) >= 100 policy steps/s.

    python bench/sim_throughput.py [--steps 300] [--tasks arm_reach quadruped_walk] [--renderer tiny]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import numpy as np
import pybullet as p

from sim.tasks import TASKS, default_config, make_policy, make_robot


def _rate(n: int, seconds: float) -> float:
    return round(n / seconds, 1)


def policy_rate(task: str, steps: int, overrides: list[str]) -> float:
    """Random-policy steps/s including observation reads (and rendering when enabled)."""
    with make_robot(default_config(task, overrides)) as robot:
        policy = make_policy("random", robot)
        obs = robot.reset(seed=0)
        for _ in range(5):  # warm-up: first renders build caches
            robot.send(policy(obs))
            obs = robot.observe()
        obs = robot.reset(seed=1)
        start = time.perf_counter()
        for _ in range(steps):
            robot.send(policy(obs))
            obs = robot.observe()
            if obs["is_last"]:
                obs = robot.reset()
        return _rate(steps, time.perf_counter() - start)


def raw_rates(task: str, overrides: list[str], n_physics: int = 5000, n_render: int = 200) -> dict[str, float]:
    """stepSimulation/s and render/s of the task's own scene, without the task's Python around them."""
    with make_robot(default_config(task, overrides)) as robot:
        robot.reset(seed=0)
        start = time.perf_counter()
        for _ in range(n_physics):
            p.stepSimulation(physicsClientId=robot.client)
        physics = _rate(n_physics, time.perf_counter() - start)
        robot.camera.render(robot.camera_base_xy())
        start = time.perf_counter()
        for _ in range(n_render):
            robot.camera.render(robot.camera_base_xy())
        render = _rate(n_render, time.perf_counter() - start)
        return {
            "substeps_per_s": physics,
            "renders_64x64_per_s": render,
            "substeps_per_policy_step": robot.cfg.substeps,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--tasks", nargs="*", default=list(TASKS))
    parser.add_argument("--renderer", default="tiny", choices=("tiny", "egl", "auto"))
    args = parser.parse_args()
    base = [f"camera.renderer={args.renderer}", "camera.width=64", "camera.height=64"]
    results = {}
    for task in args.tasks:
        results[task] = {
            "policy_steps_per_s_image": policy_rate(task, args.steps, base),
            "policy_steps_per_s_no_image": policy_rate(task, args.steps, base + ["camera.enabled=false"]),
            **raw_rates(task, base),
        }
    targets = {
        "arm_reach": ("policy_steps_per_s_image", 200.0),
        "quadruped_walk": ("policy_steps_per_s_no_image", 100.0),
    }
    checks = {
        task: {"metric": metric, "target": target, "reached": results[task][metric] >= target}
        for task, (metric, target) in targets.items()
        if task in results
    }
    print(json.dumps({
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "numpy": np.__version__, "renderer": args.renderer},
        "steps": args.steps,
        "results": results,
        "targets": checks,
    }, indent=2))


if __name__ == "__main__":
    main()
