"""The run options: one table (common/config.py OPTIONS) that agrees with the proto and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
from google.protobuf.descriptor import FieldDescriptor

from fedmoe import cli
from fedmoe.common.config import (
    DEFAULTS,
    OPTIONS,
    ConfigError,
    config_to_argv,
    config_to_dict,
    make_config,
    validate,
)
from fedmoe.common.proto import pb

# Which Python type an option may have for each proto field type.
COMPATIBLE = {
    FieldDescriptor.TYPE_UINT32: int,
    FieldDescriptor.TYPE_UINT64: int,
    FieldDescriptor.TYPE_DOUBLE: float,
    FieldDescriptor.TYPE_STRING: str,
    FieldDescriptor.TYPE_BOOL: bool,
    FieldDescriptor.TYPE_ENUM: str,  # by name on the command line, with the option's `enum`
}


def _subparser(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def test_every_runconfig_field_has_exactly_one_option_of_a_compatible_type() -> None:
    fields = {f.name: f for f in pb.RunConfig.DESCRIPTOR.fields if f.name != "run_id"}
    keys = [o.key for o in OPTIONS]
    assert len(keys) == len(set(keys)), "an option declared twice"
    assert set(keys) == set(fields), "options and RunConfig fields differ"
    assert keys == [f.name for f in pb.RunConfig.DESCRIPTOR.fields][1:], "not in field order"
    for option in OPTIONS:
        field = fields[option.key]
        assert option.type is COMPATIBLE[field.type], option.key
        if field.type == FieldDescriptor.TYPE_ENUM:
            assert option.enum, f"{option.key}: an enum field needs its names"
            assert set(option.enum.values()) <= set(field.enum_type.values_by_number)
            assert 0 not in option.enum.values()  # the UNSPECIFIED value is never a choice
        else:
            assert option.enum is None, option.key
        if option.default is not None and option.type is float:
            assert isinstance(option.default, (int, float)), option.key
        else:
            assert isinstance(option.default, option.type), option.key


def test_flags_are_distinct_and_well_formed() -> None:
    flags = [o.flag for o in OPTIONS]
    assert len(flags) == len(set(flags))
    for option in OPTIONS:
        assert option.flag.startswith("--") and option.help, option.key
        assert (option.check is None) == (not option.rule), option.key


@pytest.mark.parametrize("command", ["coordinator", "local"])
def test_every_option_is_a_flag_of(command: str) -> None:
    parser = _subparser(command)
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    for option in OPTIONS:
        action = by_flag.get(option.flag)
        assert action is not None, f"{command} lacks {option.flag}"
        assert action.dest == option.key and action.default is None
        if option.allowed():
            assert tuple(action.choices or ()) == option.allowed()


def test_defaults_pass_validation() -> None:
    assert DEFAULTS == {o.key: o.default for o in OPTIONS}
    cfg = make_config()
    validate(cfg)
    for option in OPTIONS:
        value = option.name_of(getattr(cfg, option.key))
        if option.key != "min_peers":  # 0 stands for "a majority", filled in
            assert value == option.default, option.key
    assert cfg.min_peers == DEFAULTS["peers"] // 2 + 1


def test_flags_parse_to_the_same_config() -> None:
    cfg = make_config(
        algorithm="fedavg",
        peers=6,
        seed=2**40,
        dataset="synthetic",
        lr=0.123456789012345,
        intra_peer=False,
        expert_wire_dtype="bfloat16",
        aggregation="median",
        clients_per_round=3,
        max_tensor_norm=float("inf"),
    )
    argv = config_to_argv(cfg)
    assert "--no-intra-peer" in argv and "--token-file" not in argv
    args = cli.build_parser().parse_args(["coordinator", *argv, "--out", "x"])
    again = cli.config_from_args(args)
    again.run_id = cfg.run_id
    assert again == cfg
    # Defaults give no bool flag; every other option is spelled out.
    assert "--no-intra-peer" not in config_to_argv(make_config())


def test_config_to_dict_names_enums_and_keeps_every_option() -> None:
    cfg = make_config(algorithm="local", expert_wire_dtype="float16", seed=2**40)
    out = config_to_dict(cfg)
    assert set(out) == {"run_id", *DEFAULTS}
    assert out["algorithm"] == "local" and out["expert_wire_dtype"] == "float16"
    assert out["seed"] == 2**40 and out["peers"] == 4 and out["intra_peer"] is True
    json.dumps(out, allow_nan=False)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"neighbors": -1}, "--neighbors must not be negative"),
        ({"rounds": 5_000_000_000}, "--rounds must be at most 4294967295"),
        ({"top_k": 9}, "--top-k must be between 1 and --experts"),
        ({"algorithm": "sgd"}, "--algorithm must be one of fedavg, fedmoe-da, local"),
        ({"expert_wire_dtype": "int8"}, "--expert-wire-dtype must be one of"),
        ({"dataset": "mnist"}, "--dataset must be one of digits, cifar10, synthetic"),
        ({"aggregation": "max"}, "--aggregation must be one of mean, median, trimmed-mean"),
        ({"lr": float("nan")}, "--lr must be positive"),
        ({"momentum": 1.0}, "--momentum must be in [0, 1)"),
        ({"peers": 2000}, "--peers must be in [1, 1024]"),
        ({"peers": 4, "clients_per_round": 5}, "--clients-per-round must be at most --peers"),
        ({"peers": 4, "min_peers": 5}, "--min-peers must be between 1 and --peers"),
        ({"chunk_bytes": 100}, "--chunk-bytes must be in [4 KiB, 4 MiB]"),
        ({"batch_size": 1.5}, "--batch-size must be a whole number"),
        ({"rounds": "3"}, "--rounds must be a number"),
        ({"epochs": 3}, "unknown configuration keys: ['epochs']"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        make_config(**overrides)
    assert message in str(info.value)


def test_local_refuses_a_negative_flag_as_a_flag_error(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["local", "--neighbors", "-1", "--out", str(tmp_path / "run")])
    assert info.value.code == 2
    assert "--neighbors" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_local_refuses_cifar10_without_data_dir_before_starting(
    tmp_path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["local", "--dataset", "cifar10", "--out", str(tmp_path / "run")]) == 2
    assert "--data-dir" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing was started, not even the run directory
