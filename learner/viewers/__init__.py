"""Viewers for replays and live runs: rerun (`rerun_replay`: `reverie-replay view`; `rerun_live`: the
metrics writer's live sink behind `reverie-learner train|serve --rerun`)."""
