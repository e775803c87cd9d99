"""`--config FILE` of `fedmoe local` and `fedmoe coordinator`: flags from a TOML or JSON file.

Keys are the run options (common/config.py OPTIONS) by their RunConfig name, as a run's
config.json spells them (`num_experts`, `intra_peer`), or by their flag without the dashes
(`experts`, `embed-dim` or `embed_dim`; `no_intra_peer = true`), plus the command's other flags
(`out`, `procs`, `listen`, `token_file`, ...). Explicit flags win over the file, the file over
the defaults. Unknown keys and values of the wrong type are refused, naming the key.

A run's own config.json is accepted as it is, so `--config runs/x/config.json` reruns run x:
its `run_id` is not a flag and is ignored (a rerun is a new run with a new id).
"""

from __future__ import annotations

import difflib
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmoe.common.config import OPTIONS, ConfigError, Option
from fedmoe.common.logsafe import clip_text

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads JSON only
    tomllib = None

# Keys of a run's config.json that are no flag: ignored on purpose (see the module's doc).
IGNORED_KEYS = frozenset({"run_id"})
MAX_FILE_BYTES = 1 << 20  # a configuration is a few hundred bytes


@dataclass(frozen=True)
class Key:
    """Where a file key goes: the argparse dest, the type its value must have, its choices."""

    dest: str
    type: type  # int, float, str or bool
    choices: tuple[str, ...] = ()
    negate: bool = False  # a bool option named by its flag: `no_intra_peer = true` -> False
    option: Option | None = None


def run_option_keys() -> dict[str, Key]:
    """File keys of the run options: the RunConfig name and the flag's name."""
    keys: dict[str, Key] = {}
    for o in OPTIONS:
        keys[o.key] = Key(o.key, o.type, o.allowed(), option=o)
        name = o.flag[2:]
        flag_key = Key(o.key, o.type, o.allowed(), negate=o.type is bool, option=o)
        for alias in (name, name.replace("-", "_")):
            keys.setdefault(alias, flag_key)
    return keys


def _type_name(t: type) -> str:
    return {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}[t]


def _check_value(name: str, key: Key, value: Any) -> Any:
    """The value as argparse would hold it, or ConfigError naming the key."""
    ok = (
        isinstance(value, bool)
        if key.type is bool
        else isinstance(value, str)
        if key.type is str
        else not isinstance(value, bool) and isinstance(value, (int, float))
    )
    if key.type is int and ok and value != int(value):
        ok = False
    if not ok:
        shown = clip_text(repr(value))
        raise ConfigError(f"key {name!r} must be {_type_name(key.type)} (got {shown})")
    if key.type is int:
        value = int(value)
    elif key.type is float:
        value = float(value)
    if key.choices and value not in key.choices:
        raise ConfigError(f"key {name!r} must be one of {', '.join(key.choices)} (got {value!r})")
    if key.negate:
        assert key.option is not None
        return key.option.default if not value else not key.option.default
    return value


def read_file(path: Path) -> dict[str, Any]:
    """The top-level table of a TOML or JSON file (JSON when it ends in .json)."""
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror}") from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path} is larger than {MAX_FILE_BYTES} bytes: not a configuration")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    as_json = path.suffix.lower() == ".json" or tomllib is None
    try:
        data = json.loads(text) if as_json else tomllib.loads(text)
    except ValueError as e:  # JSONDecodeError and TOMLDecodeError both are
        kind = "JSON" if as_json else "TOML"
        raise ConfigError(f"{path} is not valid {kind}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a table of keys (a JSON object)")
    return data


def load_config_file(path: Path, extra: Mapping[str, Key]) -> dict[str, Any]:
    """argparse dest -> value for every key of the file. `extra`: the command's own flags
    besides the run options (fedmoe/cli.py derives them from its parser)."""
    data = read_file(path)
    keys = {**run_option_keys(), **extra}
    out: dict[str, Any] = {}
    given: dict[str, str] = {}  # dest -> the key that set it (a key and its alias clash)
    for name, value in data.items():
        if name in IGNORED_KEYS:
            continue
        key = keys.get(name)
        if key is None:
            close = difflib.get_close_matches(name, list(keys), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown key {clip_text(name)!r}{hint}")
        if key.dest in given:
            raise ConfigError(f"{path}: keys {given[key.dest]!r} and {name!r} set the same flag")
        try:
            out[key.dest] = _check_value(name, key, value)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        given[key.dest] = name
    return out
