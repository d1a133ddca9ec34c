"""PyBullet stand-ins for robot hardware: the tasks as robot backends and as Gymnasium envs."""

from gymnasium.envs.registration import register, registry

from sim.tasks import TASKS


def _register() -> None:
    for name, entry in TASKS.items():
        if entry.gym_id not in registry:
            register(id=entry.gym_id, entry_point="sim.gym_env:SimEnv", kwargs={"task": name})


_register()
