"""An experiment file (TOML) and the runs it names.

  out = "runs/paper"                      # optional; --out wins
  base = "--dataset digits --peers 2 --rounds 2 --val-fraction 0.2"
  seeds = [0, 1, 2]                       # final runs (default [0, 1, 2])

  [algorithms]                            # name -> flags of `fedmoe local`
  fedmoe-da = "--algorithm fedmoe-da"
  fedavg-ft = "--algorithm fedavg --finetune-epochs 1"

  [settings]                              # name -> flags, or a table restricting algorithms
  "alpha=0.5" = "--alpha 0.5"
  "P=1" = { flags = "--neighbors 1", algorithms = ["fedmoe-da"] }

  [tune]
  lr = [0.01, 0.03, 0.1]                  # the same grid and budget for every algorithm
  seeds = [0]
  settings = ["alpha=0.5"]

Flags are a string (split as a shell would) or a list of strings. A run's flags are base +
algorithm + setting + --seed + --lr, later flags winning (argparse), so a setting may override
base. --seed, --lr and --out belong to the sweep and are refused elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads experiment files written as JSON only
    tomllib = None

DEFAULT_SEEDS = (0, 1, 2)
RESERVED_FLAGS = ("--seed", "--lr", "--out")
TOP_KEYS = {"out", "base", "seeds", "algorithms", "settings", "tune", "estimate"}
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


class SpecError(ValueError):
    """The experiment file cannot be run as written."""


@dataclass(frozen=True)
class Setting:
    name: str
    flags: tuple[str, ...]
    algorithms: tuple[str, ...] | None = None  # None: every algorithm

    def applies_to(self, algorithm: str) -> bool:
        return self.algorithms is None or algorithm in self.algorithms


@dataclass(frozen=True)
class Run:
    """One `fedmoe local` invocation; its directory name comes from its full flag list."""

    phase: str  # "tune" or "final"
    algorithm: str
    setting: str
    seed: int
    lr: float
    flags: tuple[str, ...]

    @property
    def key(self) -> str:
        """A short hash of the flag list: equal flags, equal run (a tuning run at the selected
        lr and a final seed is one run, done once)."""
        return hashlib.sha256(json.dumps(list(self.flags)).encode()).hexdigest()[:10]

    @property
    def name(self) -> str:
        return (
            f"{Run.safe(f'{self.algorithm}_{self.setting}_s{self.seed}_lr{self.lr:g}')}-{self.key}"
        )

    @staticmethod
    def safe(text: str) -> str:
        """text as a file name: runs of other characters become one '_'."""
        return _SAFE.sub("_", text)


@dataclass
class Experiment:
    path: Path
    base: tuple[str, ...]
    algorithms: dict[str, tuple[str, ...]]
    settings: dict[str, Setting]
    seeds: tuple[int, ...]
    lr_grid: tuple[float, ...]
    tune_seeds: tuple[int, ...]
    tune_settings: tuple[str, ...]
    out: Path | None = None
    seconds_per_peer_round: float | None = None  # [estimate], for --dry-run
    extra: dict[str, Any] = field(default_factory=dict)

    def flags(self, algorithm: str, setting: str, seed: int, lr: float) -> tuple[str, ...]:
        return (
            *self.base,
            *self.algorithms[algorithm],
            *self.settings[setting].flags,
            "--seed",
            str(seed),
            "--lr",
            repr(lr),
        )

    def run(self, phase: str, algorithm: str, setting: str, seed: int, lr: float) -> Run:
        return Run(phase, algorithm, setting, seed, lr, self.flags(algorithm, setting, seed, lr))

    def tuning_runs(self) -> list[Run]:
        """Every algorithm x tuning setting x tuning seed x lr: one grid, one budget for all."""
        return [
            self.run("tune", a, s, seed, lr)
            for a in self.algorithms
            for s in self.tune_settings
            if self.settings[s].applies_to(a)
            for seed in self.tune_seeds
            for lr in self.lr_grid
        ]

    def final_runs(self, selected_lr: dict[str, float]) -> list[Run]:
        return [
            self.run("final", a, s, seed, selected_lr[a])
            for s, setting in self.settings.items()
            for a in self.algorithms
            if setting.applies_to(a)
            for seed in self.seeds
        ]


def _flags(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            flags = shlex.split(value)
        except ValueError as e:
            raise SpecError(f"{where}: {e}") from None
    elif isinstance(value, list) and all(isinstance(x, str) for x in value):
        flags = list(value)
    else:
        raise SpecError(f"{where}: flags must be a string or a list of strings")
    for flag in flags:
        name = flag.split("=", 1)[0]
        if name in RESERVED_FLAGS:
            raise SpecError(f"{where}: {name} is set by the sweep (seeds, tune.lr, --out)")
    return tuple(flags)


def _ints(value: object, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not value:
        raise SpecError(f"{where}: must be a non-empty list of whole numbers")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value):
        raise SpecError(f"{where}: must be a non-empty list of whole numbers >= 0")
    if len(set(value)) != len(value):
        raise SpecError(f"{where}: a value is given twice")
    return tuple(value)


def _table(data: dict, key: str) -> dict:
    value = data.get(key)
    if not isinstance(value, dict) or not value:
        raise SpecError(f"[{key}] must name at least one entry")
    return value


def parse_experiment(data: dict, path: Path) -> Experiment:
    unknown = set(data) - TOP_KEYS
    if unknown:
        raise SpecError(f"unknown keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    base = _flags(data.get("base", []), "base")
    algorithms = {
        str(n): _flags(f, f"algorithms.{n}") for n, f in _table(data, "algorithms").items()
    }
    settings: dict[str, Setting] = {}
    for name, value in _table(data, "settings").items():
        where = f"settings.{name}"
        if isinstance(value, dict):
            if set(value) - {"flags", "algorithms"}:
                raise SpecError(f"{where}: a table holds only 'flags' and 'algorithms'")
            only = value.get("algorithms")
            if only is not None:
                if not isinstance(only, list) or not only or not all(o in algorithms for o in only):
                    raise SpecError(
                        f"{where}.algorithms: a non-empty list of names from [algorithms]"
                    )
                only = tuple(only)
            settings[name] = Setting(name, _flags(value.get("flags", []), where), only)
        else:
            settings[name] = Setting(name, _flags(value, where))
    seeds = _ints(data.get("seeds", list(DEFAULT_SEEDS)), "seeds")

    tune = data.get("tune")
    if not isinstance(tune, dict):
        raise SpecError("[tune] is required: lr = [...], seeds = [...], settings = [...]")
    if set(tune) - {"lr", "seeds", "settings"}:
        raise SpecError("[tune] holds only lr, seeds and settings")
    grid = tune.get("lr")
    if (
        not isinstance(grid, list)
        or not grid
        or not all(isinstance(x, int | float) and not isinstance(x, bool) and x > 0 for x in grid)
    ):
        raise SpecError("tune.lr: a non-empty list of positive learning rates")
    if len(set(grid)) != len(grid):
        raise SpecError("tune.lr: a value is given twice")
    tune_seeds = _ints(tune.get("seeds", [seeds[0]]), "tune.seeds")
    tune_settings = tune.get("settings", [next(iter(settings))])
    if not isinstance(tune_settings, list) or not tune_settings:
        raise SpecError("tune.settings: a non-empty list of names from [settings]")
    for s in tune_settings:
        if s not in settings:
            raise SpecError(f"tune.settings: {s!r} is not in [settings]")
    for a in algorithms:
        if not any(settings[s].applies_to(a) for s in tune_settings):
            raise SpecError(f"algorithm {a!r} runs in none of tune.settings: it cannot be tuned")

    out = data.get("out")
    if out is not None and not isinstance(out, str):
        raise SpecError("out: a directory path")
    spr = None
    estimate = data.get("estimate", {})
    if not isinstance(estimate, dict) or set(estimate) - {"seconds_per_peer_round"}:
        raise SpecError("[estimate] holds only seconds_per_peer_round")
    if "seconds_per_peer_round" in estimate:
        spr = estimate["seconds_per_peer_round"]
        if not isinstance(spr, int | float) or isinstance(spr, bool) or spr <= 0:
            raise SpecError("estimate.seconds_per_peer_round: a positive number")
        spr = float(spr)
    return Experiment(
        path=path,
        base=base,
        algorithms=algorithms,
        settings=settings,
        seeds=seeds,
        lr_grid=tuple(float(x) for x in grid),
        tune_seeds=tune_seeds,
        tune_settings=tuple(tune_settings),
        out=Path(out) if out else None,
        seconds_per_peer_round=spr,
    )


def load_experiment(path: Path) -> Experiment:
    """A TOML file (or JSON, by its .json suffix, the same keys)."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise SpecError(f"cannot read {path}: {e}") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e})") from None
    elif tomllib is None:
        raise SpecError(f"{path}: TOML needs Python 3.11 (or write the file as .json)")
    else:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SpecError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(data, dict):
        raise SpecError(f"{path}: not a table of keys")
    return parse_experiment(data, path)
