"""The Python API: `fedmoe.run_local(config)` runs what `fedmoe local` runs, and returns its
results instead of only printing them.

    import fedmoe
    result = fedmoe.run_local({"dataset": "digits", "peers": 2, "rounds": 2}, out="runs/api")
    result.summary["final_accuracy_mean"], len(result.records), result.run_dir

The same code path as the command: the configuration is checked by make_config/validate, the
plug-ins and the data split by fedmoe.local.start, then the coordinator and the peers run as
separate processes on loopback.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmoe.common.config import OPTION_BY_KEY, OPTIONS, ConfigError, make_config
from fedmoe.common.proto import pb


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    summary: dict[str, Any]  # summary.json: final accuracies, bytes, timings, launcher record
    records: list[dict[str, Any]]  # metrics.jsonl: one record per peer per round
    config: dict[str, Any]  # config.json: every option as the run used it


class RunFailed(RuntimeError):
    """The run started but did not finish well; its logs are in `run_dir`."""

    def __init__(self, code: int, run_dir: Path) -> None:
        super().__init__(f"fedmoe local exited {code}; logs in {run_dir}")
        self.code = code
        self.run_dir = run_dir


def to_config(config: Mapping[str, Any] | pb.RunConfig) -> pb.RunConfig:
    """A checked RunConfig from option keys (common/config.py OPTIONS) or a RunConfig."""
    from fedmoe.cli import absolute_paths

    if isinstance(config, pb.RunConfig):
        values = {o.key: o.name_of(getattr(config, o.key)) for o in OPTIONS}
        return make_config(**absolute_paths(values))
    if not isinstance(config, Mapping):
        raise ConfigError(
            f"config must be a dict of option names or a RunConfig, not {type(config).__name__}"
        )
    unknown = sorted(k for k in config if k not in OPTION_BY_KEY)
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), list(OPTION_BY_KEY), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(
            f"unknown configuration keys: {', '.join(hints)}; the keys are those of "
            "fedmoe.common.config.OPTIONS (e.g. 'num_experts' for --experts)"
        )
    return make_config(**absolute_paths(dict(config)))


def run_local(
    config: Mapping[str, Any] | pb.RunConfig,
    out: str | Path | None = None,
    procs: int | None = None,
    quiet: bool = False,
) -> RunResult:
    """Run `config` on this machine (coordinator + peers as processes) and return its results.

    `out`: the run directory (default: a fresh runs/<algorithm>-<time>); `procs`: peer
    processes (as --procs); `quiet`: keep the progress lines and the table off stdout.
    ConfigError for a configuration, plug-in or data set that cannot run (nothing started);
    RunFailed when the run itself fails.
    """
    from fedmoe.cli import build_parser
    from fedmoe.local import start

    cfg = to_config(config)
    args = build_parser().parse_args(["local"])  # every launcher option at its default
    args.out = Path(out) if out is not None else None
    args.procs = procs
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        code = start(args, cfg)
    run_dir = Path(args.out)
    if code != 0:
        raise RunFailed(code, run_dir)
    return load_result(run_dir)


def load_result(run_dir: Path) -> RunResult:
    """The results a finished run wrote into `run_dir`."""
    records = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return RunResult(
        run_dir=run_dir,
        summary=json.loads((run_dir / "summary.json").read_text()),
        records=records,
        config=json.loads((run_dir / "config.json").read_text()),
    )
