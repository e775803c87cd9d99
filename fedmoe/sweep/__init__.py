"""`fedmoe sweep CONFIG` (also bench/experiments.py): many `fedmoe local` runs from one TOML file:
learning-rate tuning on the validation split, then every algorithm x setting x seed, then tables
and plots. One module per job: spec (the file -> runs), runner (resumable execution), select
(tuning), results (results.json, results.md), figures (PNG plots), main (the command)."""
