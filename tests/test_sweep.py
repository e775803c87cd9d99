"""`fedmoe sweep` on fabricated runs: a launcher that writes summary.json and metrics.jsonl
instead of training, so selection, resume, tables and plots are checked in milliseconds."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from fedmoe.sweep.main import SweepError, dry_run, sweep
from fedmoe.sweep.runner import RUN_RECORD
from fedmoe.sweep.select import SelectionError
from fedmoe.sweep.spec import Run, SpecError, load_experiment

EXPERIMENT = """
base = "--dataset digits --peers 2 --rounds 2"
seeds = [0, 1, 2]

[algorithms]
fedmoe-da = "--algorithm fedmoe-da"
fedavg = "--algorithm fedavg"

[settings]
"alpha=0.5" = "--alpha 0.5"
"alpha=0.1" = "--alpha 0.1"
"P=1" = { flags = "--neighbors 1", algorithms = ["fedmoe-da"] }

[tune]
lr = [0.01, 0.1]
seeds = [0]
settings = ["alpha=0.5"]
"""

# lr 0.1 has the best TEST accuracy, lr 0.01 the best VALIDATION accuracy: 0.01 must win.
VAL = {0.01: 0.9, 0.1: 0.5}
TEST = {0.01: 0.6, 0.1: 0.95}


class FakeLauncher:
    """Writes what `fedmoe local` would: metrics.jsonl (2 peers x rounds) and summary.json."""

    def __init__(self, val: dict[float, float | None] | None = None, fail: set[str] = frozenset()):
        self.calls: list[Run] = []
        self.val = VAL if val is None else val
        self.fail = fail

    def __call__(self, run: Run, run_dir: Path) -> int:
        self.calls.append(run)
        if run.name in self.fail:
            (run_dir / "metrics.jsonl").write_text("")  # a crash: records, no summary
            return 1
        acc = TEST[run.lr] + 0.1 * run.seed  # 0.6, 0.7, 0.8 over seeds 0-2 at lr 0.01
        coord = 1000 * (1 + run.seed)  # per peer per round, sent; as much received
        p2p = 500 if run.algorithm == "fedmoe-da" else 0
        records = [
            {
                "round": r,
                "peer": f"peer-{k}",
                "accuracy": acc * r / 2,
                "global_accuracy": acc / 2 * r / 2,
                "loss": 1.0 / r,
                "seconds": float(r),
                "bytes": {
                    "coordinator_sent": coord,
                    "coordinator_received": coord,
                    "p2p_sent": p2p,
                    "p2p_received": p2p,
                },
            }
            for r in (1, 2)
            for k in (0, 1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
        summary = {
            "algorithm": run.algorithm,
            "peers": 2,
            "rounds": 2,
            "status": "completed",
            "final_accuracy_mean": acc,
            "final_global_accuracy_mean": acc / 2,
            "final_val_accuracy_mean": self.val[run.lr],
            "bytes": {"coordinator": 8 * coord, "p2p": 4 * p2p},
            "seconds": 3.0,
        }
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return 0


def experiment(tmp_path: Path, text: str = EXPERIMENT):
    path = tmp_path / "exp.toml"
    path.write_text(text)
    return load_experiment(path)


def run_sweep(tmp_path: Path, launcher: FakeLauncher, text: str = EXPERIMENT) -> Path:
    return sweep(experiment(tmp_path, text), tmp_path / "out", launcher, io.StringIO())


def results(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_lr_is_selected_on_validation_accuracy_not_test(tmp_path):
    run_sweep(tmp_path, FakeLauncher())
    data = results(tmp_path)
    assert data["selected_lr"] == {"fedmoe-da": 0.01, "fedavg": 0.01}
    assert {r["lr"] for r in data["runs"]} == {0.01}
    assert data["tuning"]["val_accuracy"]["fedavg"] == {"0.01": 0.9, "0.1": 0.5}


def test_the_same_grid_runs_for_every_algorithm(tmp_path):
    launcher = FakeLauncher()
    run_sweep(tmp_path, launcher)
    tuned = {(r.algorithm, r.lr) for r in launcher.calls if r.phase == "tune"}
    assert tuned == {(a, lr) for a in ("fedmoe-da", "fedavg") for lr in (0.01, 0.1)}


def test_every_algorithm_setting_seed_runs_once(tmp_path):
    launcher = FakeLauncher()
    run_sweep(tmp_path, launcher)
    finals = {(r["algorithm"], r["setting"], r["seed"]) for r in results(tmp_path)["runs"]}
    # P=1 only for fedmoe-da; 2 + 2 + 1 (algorithm, setting) pairs x 3 seeds
    assert len(finals) == len(results(tmp_path)["runs"]) == 15
    assert ("fedavg", "P=1", 0) not in finals
    # the tuning run at the selected lr and seed 0 is the final run: launched once
    names = [r.name for r in launcher.calls]
    assert len(names) == len(set(names)) == 4 + 15 - 2


def test_missing_validation_accuracy_is_an_error(tmp_path):
    with pytest.raises(SelectionError, match="--val-fraction"):
        run_sweep(tmp_path, FakeLauncher(val={0.01: None, 0.1: None}))
    assert not (tmp_path / "out" / "results.json").exists()


def test_missing_validation_key_is_an_error(tmp_path):
    launcher = FakeLauncher()
    original = launcher.__call__

    def without_val(run: Run, run_dir: Path) -> int:
        code = original(run, run_dir)
        summary = json.loads((run_dir / "summary.json").read_text())
        del summary["final_val_accuracy_mean"]
        (run_dir / "summary.json").write_text(json.dumps(summary))
        return code

    with pytest.raises(SelectionError, match="--val-fraction"):
        sweep(experiment(tmp_path), tmp_path / "out", without_val, io.StringIO())


def test_a_second_invocation_runs_nothing(tmp_path):
    run_sweep(tmp_path, FakeLauncher())
    first = (tmp_path / "out" / "results.md").read_text()
    again = FakeLauncher()
    run_sweep(tmp_path, again)
    assert again.calls == []
    assert (tmp_path / "out" / "results.md").read_text() == first


def test_a_crashed_run_fails_the_sweep_and_only_it_reruns(tmp_path):
    exp = experiment(tmp_path)
    victim = exp.final_runs({"fedmoe-da": 0.01, "fedavg": 0.01})[-1]
    with pytest.raises(SweepError, match="1 final run"):
        run_sweep(tmp_path, FakeLauncher(fail={victim.name}))
    assert (tmp_path / "out" / "runs" / victim.name / "metrics.jsonl").exists()
    again = FakeLauncher()
    run_sweep(tmp_path, again)
    assert [r.name for r in again.calls] == [victim.name]
    record = json.loads((tmp_path / "out" / "runs" / victim.name / RUN_RECORD).read_text())
    assert record["exit_status"] == 0


def test_a_run_without_its_rounds_is_not_complete(tmp_path):
    """Seen for real: every peer dropped out, the coordinator wrote status "completed" with no
    round done, then exited 1. Neither this sweep nor the next may take it as done."""
    exp = experiment(tmp_path)
    victim = exp.final_runs({"fedmoe-da": 0.01, "fedavg": 0.01})[-1]
    launcher = FakeLauncher()

    def empty_run(run: Run, run_dir: Path) -> int:
        if run.name != victim.name:
            return launcher(run, run_dir)
        summary = {"status": "completed", "rounds": 2, "rounds_completed": 0}
        (run_dir / "summary.json").write_text(json.dumps({**summary, "final_accuracy_mean": None}))
        return 1

    for _ in range(2):
        with pytest.raises(SweepError, match="1 final run"):
            sweep(exp, tmp_path / "out", empty_run, io.StringIO())
    again = FakeLauncher()
    run_sweep(tmp_path, again)
    assert [r.name for r in again.calls] == [victim.name]


def test_a_partial_run_is_cleared_and_rerun(tmp_path):
    run_sweep(tmp_path, FakeLauncher())
    victim = tmp_path / "out" / "runs" / results(tmp_path)["runs"][3]["run_dir"].split("/")[-1]
    (victim / "summary.json").write_text('{"status": "compl')  # cut off mid-write
    (victim / "stale.txt").write_text("left by the crashed run")
    again = FakeLauncher()
    run_sweep(tmp_path, again)
    assert [tmp_path / "out" / "runs" / r.name for r in again.calls] == [victim]
    assert not (victim / "stale.txt").exists()


def test_results_table_is_mean_and_std_over_seeds(tmp_path):
    md = run_sweep(tmp_path, FakeLauncher()).read_text()
    section = md.split("## alpha=0.1")[1].split("##")[0]
    fedavg = next(line for line in section.splitlines() if line.startswith("| fedavg |"))
    cells = [c.strip() for c in fedavg.strip("|").split("|")]
    # lr, seeds, personalised 0.6/0.7/0.8, global half of it, coordinator 8000*(1+seed) B
    assert cells[1:] == [
        "0.01",
        "3",
        "0.7000 ± 0.1000",
        "0.3500 ± 0.0500",
        "0.02 ± 0.01",
        "0.00 ± 0.00",
    ]
    assert "**0.9000**" in md  # the selected lr's validation accuracy, in the tuning table
    p1 = md.split("## P=1")[1].split("##")[0]
    assert "| fedmoe-da |" in p1 and "| fedavg |" not in p1


def test_plots_are_written_per_setting(tmp_path):
    md = run_sweep(tmp_path, FakeLauncher()).read_text()
    plots = sorted((tmp_path / "out" / "plots").glob("*.png"))
    assert len(plots) == 3 * 2
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"(plots/{path.name})" in md


def test_run_directory_names_follow_the_flags(tmp_path):
    exp = experiment(tmp_path)
    a = exp.run("final", "fedavg", "alpha=0.5", 1, 0.01)
    assert a.name == exp.run("tune", "fedavg", "alpha=0.5", 1, 0.01).name
    assert a.name != exp.run("final", "fedavg", "alpha=0.5", 2, 0.01).name
    assert a.name != exp.run("final", "fedavg", "alpha=0.5", 1, 0.1).name
    assert a.name.startswith("fedavg_alpha=0.5_s1_lr0.01-")


@pytest.mark.parametrize(
    "change, message",
    [
        (("--alpha 0.5", "--alpha 0.5 --lr 0.3"), "--lr is set by the sweep"),
        (('settings = ["alpha=0.5"]', 'settings = ["nope"]'), "'nope' is not in"),
        (("lr = [0.01, 0.1]", "lr = []"), "tune.lr"),
        (("seeds = [0, 1, 2]", "seeds = [0, 0]"), "given twice"),
        (('algorithms = ["fedmoe-da"]', 'algorithms = ["other"]'), "settings.P=1.algorithms"),
    ],
)
def test_bad_experiment_files_are_refused(tmp_path, change, message):
    with pytest.raises(SpecError, match=message.replace("[", r"\[")):
        experiment(tmp_path, EXPERIMENT.replace(*change))


def test_bad_run_flags_are_refused_before_anything_runs(tmp_path):
    launcher = FakeLauncher()
    with pytest.raises(SpecError, match="--rounds 0"):
        run_sweep(tmp_path, launcher, EXPERIMENT.replace('"--alpha 0.1"', '"--rounds 0"'))
    assert launcher.calls == []


def test_dry_run_lists_runs_and_estimates_time(tmp_path):
    exp = experiment(tmp_path, EXPERIMENT + "[estimate]\nseconds_per_peer_round = 1.5\n")
    out = io.StringIO()
    dry_run(exp, tmp_path / "out" / "runs", out)
    text = out.getvalue()
    # tuning runs, then the final runs that are not a tuning run at the lr to be selected
    assert text.count("todo") == 4 + 15 - 2
    assert "(lr to be tuned)" in text
    # 17 runs x 2 rounds x 2 peers x 1.5 s = 102 s
    assert "work left: 68 peer-rounds; time ~2 min" in text
    run_sweep(tmp_path, FakeLauncher())
    out = io.StringIO()
    dry_run(exp, tmp_path / "out" / "runs", out)
    assert out.getvalue().count("done") == 4 + 15 - 2 and "todo" not in out.getvalue()
    assert "work left: 0 peer-rounds" in out.getvalue()


def test_experiment_files_in_the_repository_parse():
    for path in sorted((Path(__file__).resolve().parents[1] / "experiments").glob("*.toml")):
        exp = load_experiment(path)
        assert exp.tuning_runs() and exp.lr_grid


def test_fedmoe_sweep_command_dry_run(tmp_path, capsys):
    from fedmoe.cli import main

    path = tmp_path / "exp.toml"
    path.write_text(EXPERIMENT)
    assert main(["sweep", str(path), "--dry-run", "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "== tune" in text and "(lr to be tuned)" in text
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    path.write_text(EXPERIMENT.replace("lr = [0.01, 0.1]", "lr = [0.01, 0.01]"))
    assert main(["sweep", str(path), "--dry-run"]) == 2
    assert "tune.lr: a value is given twice" in capsys.readouterr().err


def _has_val_fraction() -> bool:
    from fedmoe.common.config import OPTIONS

    return any(o.flag == "--val-fraction" for o in OPTIONS)


@pytest.mark.skipif(not _has_val_fraction(), reason="needs --val-fraction (branch evidence-val)")
def test_real_sweep_end_to_end(tmp_path, capsys):
    """Real `fedmoe local` runs (processes, gRPC on loopback), digits, one round: tuning picks
    an lr from the grid on validation accuracy, and a second invocation runs nothing."""
    from fedmoe.cli import main

    path = tmp_path / "tiny.toml"
    path.write_text(
        'base = "--dataset digits --peers 2 --rounds 1 --val-fraction 0.2"\n'
        "seeds = [0]\n"
        '[algorithms]\nfedmoe-da = "--algorithm fedmoe-da"\n'
        '[settings]\n"alpha=0.5" = "--alpha 0.5"\n'
        '[tune]\nlr = [0.05, 0.1]\nseeds = [0]\nsettings = ["alpha=0.5"]\n'
    )
    out = tmp_path / "out"
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())
    assert set(data["selected_lr"]) == {"fedmoe-da"}
    for algorithm, by_lr in data["tuning"]["val_accuracy"].items():
        best = max(by_lr, key=lambda lr: by_lr[lr])
        assert data["selected_lr"][algorithm] == float(best)
    assert len(data["runs"]) == 1
    for row in data["runs"]:
        assert 0.0 <= row["final_accuracy"] <= 1.0 and row["bytes_coordinator"] > 0
    assert len(list((out / "runs").iterdir())) == 2  # the final run is a tuning run: not rerun
    capsys.readouterr()
    assert main(["sweep", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done before") == 2 + 1
