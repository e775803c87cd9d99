"""bench/scenario.py end to end with real namespaces (needs root and iproute2, like
test_multihost.py): a tiny run (synthetic data, 2 peers, 2 rounds) of two algorithms on the
server-bottleneck profile. Checks the JSON, the plot, the time-to-target arithmetic against the
records, and that no namespace or link of the run is left behind. No timing assertions."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))

from netns import list_netns, list_root_links  # noqa: E402

from fedmoe.scenarios import round_series, time_to_target  # noqa: E402

PREFIX = "fss-"


def test_scenario_runner_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "sc"
    cmd = [
        sys.executable, str(REPO / "bench" / "scenario.py"),
        "--network", "server-bottleneck", "--algorithms", "fedmoe-da,fedavg",
        "--dataset", "synthetic", "--peers", "2", "--rounds", "2", "--threads", "1",
        "--prefix", PREFIX, "--out", str(out), "--json", str(tmp_path / "all.json"),
        "--timeout", "600",
        "--sync-every", "1",  # not the runner's own: handed to the coordinator as a run option
    ]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    print(p.stdout[-3000:])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert list_netns(PREFIX) == [] and list_root_links(PREFIX) == []

    result = json.loads((out / "server-bottleneck" / "scenario.json").read_text())
    assert json.loads((tmp_path / "all.json").read_text())["server-bottleneck"] == result
    assert (out / "server-bottleneck" / "accuracy_vs_time.png").stat().st_size > 1000
    assert result["profile"]["mbit_s"]["coord"] == [50, 50]
    assert result["settings"]["run_options"] == ["--sync-every", "1"]
    assert set(result["algorithms"]) == {"fedmoe-da", "fedavg"}

    fedavg_records = [
        json.loads(x)
        for x in (out / "server-bottleneck" / "fedavg" / "metrics.jsonl").read_text().splitlines()
    ]
    final = [r["accuracy"] for r in fedavg_records if r["round"] == 2]
    assert len(final) == 2 and result["target"] == sum(final) / 2  # default: FedAvg's final
    for alg, row in result["algorithms"].items():
        for key in ("final", "time_to_target_s", "round_of_target", "mean_round_s", "total_s",
                    "coordinator_mb", "p2p_mb", "speedup_vs_fedavg", "series", "launcher",
                    "phase_mean_s", "outside_train_evaluate_share"):  # fmt: skip
            assert key in row, (alg, key)
        assert [s["round"] for s in row["series"]] == [1, 2]
        assert "tbf" in row["launcher"]["link"] and row["coordinator_mb"] > 0
        records = [
            json.loads(x) for x in Path(row["run_dir"], "metrics.jsonl").read_text().splitlines()
        ]
        assert all(isinstance(r["reported_at"], float) for r in records)
        expect = time_to_target(round_series(records), result["target"])
        assert (row["time_to_target_s"], row["round_of_target"]) == expect
    # FedAvg reaches its own final accuracy by its last round at the latest
    assert result["algorithms"]["fedavg"]["round_of_target"] in (1, 2)
    assert result["algorithms"]["fedavg"]["speedup_vs_fedavg"] == 1.0
    assert "to target s" in p.stdout and "fedmoe-da" in p.stdout

    # --reuse: the completed runs are compared again, not run again
    again = subprocess.run([*cmd, "--reuse"], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("reusing") == 2 and "veth + bridge" not in again.stdout
    redone = json.loads((out / "server-bottleneck" / "scenario.json").read_text())
    for alg, row in redone["algorithms"].items():
        assert row["time_to_target_s"] == result["algorithms"][alg]["time_to_target_s"]


def test_interrupted_run_leaves_nothing_behind(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT) while the processes run in the namespaces: all of it is removed."""
    cmd = [
        sys.executable, str(REPO / "bench" / "scenario.py"), "--network", "heterogeneous",
        "--algorithms", "fedavg", "--dataset", "synthetic", "--peers", "2", "--rounds", "50",
        "--threads", "1", "--prefix", PREFIX, "--out", str(tmp_path / "sc"),
    ]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert p.stdout is not None
        line = p.stdout.readline()  # printed once the topology is up, as the processes start
        assert line.startswith("[heterogeneous] fedavg: veth"), line
        assert len(list_netns(PREFIX)) == 4  # switch, coordinator, 2 peers
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=120) != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert list_netns(PREFIX) == [] and list_root_links(PREFIX) == []
