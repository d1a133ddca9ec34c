"""The offline toolbox behind `reverie-replay` (one module per verb) and `reverie-learner train --offline`:
reading a replay directory without a learner (`reader`), choosing episodes (`select`), tables, plots,
videos, world-model evaluation, filter/merge/split, demonstrations and training from fixed data."""
