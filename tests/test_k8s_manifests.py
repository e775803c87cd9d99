"""The Kubernetes manifests (deploy/k8s): rendered, checked against the Kubernetes API schemas,
and checked for the invariants that make a run work.

What is checked, and how:
- Rendering: a small renderer for the subset of kustomize the manifests use (resources, a
  secretGenerator of files without a hash suffix, strategic merge patches). It refuses any other
  kustomization key or patch directive rather than ignore it. When `kubectl` is installed its
  own `kubectl kustomize` output must be the same objects.
- Schemas: every object against the OpenAPI schemas bundled by kubernetes-validate (offline),
  strict (unknown fields are errors), for Kubernetes 1.28 (the oldest the manifests support:
  the StatefulSet pod-index label) and the newest it bundles.
- Invariants: names, ports and selectors that must agree across objects; the containers'
  command lines parsed by fedmoe's own argument parser; the advertised address accepted by the
  coordinator's own check; the join token Secret; GPUs only in the overlay; probes; hardened
  securityContext; writable paths on volumes (the root filesystem is read-only).
- The image's entrypoint under a non-root uid (runAsNonRoot): it runs `fedmoe "$@"` as is.

Not checked here (no cluster): scheduling, DNS, volume provisioning, a run on Kubernetes.
"""

from __future__ import annotations

import base64
import copy
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from fedmoe.cli import build_parser
from fedmoe.common.auth import load_token
from fedmoe.common.netaddr import check_advertise

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
ENTRYPOINT = REPO / "docker" / "entrypoint.sh"
TOKEN = "k8s-test-token-0123456789abcdef"
OLDEST = "1.28.0"  # metadata.labels['apps.kubernetes.io/pod-index'] (beta, on by default)
GPU = "nvidia.com/gpu"

Obj = dict[str, Any]


# ------------------------------------------------------------------------------ the renderer

KUSTOMIZATION_KEYS = {
    "apiVersion",
    "kind",
    "resources",
    "secretGenerator",
    "generatorOptions",
    "patches",
}
# Lists that strategic merge patches merge item by item (Kubernetes' patchMergeKey); any other
# list is replaced whole, as the API server and kustomize do for them.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
}


class Unsupported(Exception):
    """The kustomization uses something this renderer does not implement."""


def load_docs(path: Path) -> list[Obj]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def merge(base: Any, patch: Any, key: str = "") -> Any:
    """Strategic merge patch of the subset used: maps merge, MERGE_KEYS lists merge by key."""
    if isinstance(base, dict) and isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise Unsupported(f"patch directive in {sorted(patch)}")
        out = dict(base)
        for k, v in patch.items():
            out[k] = merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(patch, list) and key in MERGE_KEYS:
        by = MERGE_KEYS[key]
        out_list = [copy.deepcopy(item) for item in base]
        for item in patch:
            at = [i for i, old in enumerate(out_list) if old[by] == item[by]]
            if at:
                out_list[at[0]] = merge(out_list[at[0]], item)
            else:
                out_list.append(copy.deepcopy(item))
        return out_list
    return copy.deepcopy(patch)


def render(directory: Path) -> list[Obj]:
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kust) - KUSTOMIZATION_KEYS
    if unknown:
        raise Unsupported(f"{directory}: kustomization keys {sorted(unknown)}")
    objects: list[Obj] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        objects += render(path) if path.is_dir() else load_docs(path)
    generators = kust.get("secretGenerator", [])
    if generators and not kust.get("generatorOptions", {}).get("disableNameSuffixHash"):
        raise Unsupported("a secretGenerator with a hash suffix")
    for gen in generators:
        if set(gen) - {"name", "type", "files"}:
            raise Unsupported(f"secretGenerator keys {sorted(gen)}")
        data = {}
        for spec in gen["files"]:
            name, _, source = spec.rpartition("=") if "=" in spec else (Path(spec).name, "", spec)
            data[name] = base64.b64encode((directory / source).read_bytes()).decode()
        meta = {"name": gen["name"]}
        objects.append({"apiVersion": "v1", "kind": "Secret", "metadata": meta, "data": data})
        objects[-1]["type"] = gen.get("type", "Opaque")
    for entry in kust.get("patches", []):
        if set(entry) != {"path"}:
            raise Unsupported(f"patch entry {entry}")
        for patch in load_docs(directory / entry["path"]):
            at = [
                i
                for i, o in enumerate(objects)
                if (o["kind"], o["metadata"]["name"]) == (patch["kind"], patch["metadata"]["name"])
            ]
            assert len(at) == 1, f"patch {entry['path']} matches {len(at)} objects"
            objects[at[0]] = merge(objects[at[0]], patch)
    return objects


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tree() -> Iterator[Path]:
    """A copy of deploy/k8s with a test token (the real tree keeps its token, if any, alone)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "k8s"
        shutil.copytree(K8S, root)
        (root / "base" / "join-token").write_text(TOKEN + "\n")
        yield root


@pytest.fixture(scope="module")
def rendered(tree: Path) -> dict[str, list[Obj]]:
    return {"base": render(tree / "base"), "gpu": render(tree / "overlays" / "gpu")}


def one(objects: list[Obj], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} objects of kind {kind} {name or ''}"
    return found[0]


def pod_spec(obj: Obj) -> Obj:
    return obj["spec"]["template"]["spec"]


def container(obj: Obj) -> Obj:
    containers = pod_spec(obj)["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(c: Obj) -> dict[str, Obj]:
    return {e["name"]: e for e in c.get("env", [])}


def expand(c: Obj, values: dict[str, str]) -> list[str]:
    """The container's args with Kubernetes' $(VAR) references replaced: env `value`s, and
    `values` for the downward-API ones (what Kubernetes would put there for one pod)."""
    env = {k: e.get("value") for k, e in env_of(c).items()}
    env.update(values)
    out = []
    for arg in c["args"]:
        for k, v in env.items():
            arg = arg.replace(f"$({k})", v if v is not None else f"$({k})")
        assert "$(" not in arg, f"unresolved reference in {arg!r}"
        out.append(arg)
    return out


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def peer_args(objects: list[Obj], ordinal: int = 3, namespace: str = "research") -> list[str]:
    sts = one(objects, "StatefulSet")
    values = {
        "POD_NAME": f"{sts['metadata']['name']}-{ordinal}",
        "POD_NAMESPACE": namespace,
        "PEER_INDEX": str(ordinal),
    }
    return expand(container(sts), values)


def coordinator_args(objects: list[Obj]) -> list[str]:
    return expand(container(one(objects, "Job")), {})


def port_of(c: Obj, name: str) -> int:
    return next(p["containerPort"] for p in c["ports"] if p["name"] == name)


def listen_port(args: list[str]) -> int:
    return int(flag(args, "--listen").rsplit(":", 1)[1])


VARIANTS = ["base", "gpu"]


# ------------------------------------------------------------------------------ rendering


def test_renders_the_expected_objects(rendered: dict[str, list[Obj]]) -> None:
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["base"])
    assert kinds == [
        ("Job", "fedmoe-coordinator"),
        ("PersistentVolumeClaim", "fedmoe-results"),
        ("Secret", "fedmoe-join-token"),
        ("Service", "fedmoe-coordinator"),
        ("Service", "fedmoe-peers"),
        ("StatefulSet", "fedmoe-peer"),
    ]
    gpu = sorted((o["kind"], o["metadata"]["name"]) for o in rendered["gpu"])
    assert gpu == kinds


def normalised(obj: Any) -> Any:
    """Order-free form: kustomize moves patched list items first; order of named items (env,
    containers, volumes) means nothing to Kubernetes here (no env refers to another)."""
    if isinstance(obj, dict):
        return {k: normalised(v) for k, v in obj.items()}
    if isinstance(obj, list):
        items = [normalised(v) for v in obj]
        if items and all(isinstance(v, dict) and "name" in v for v in items):
            items.sort(key=lambda v: v["name"])
        return items
    return obj


@pytest.mark.parametrize("variant", ["base", "overlays/gpu"])
def test_kubectl_kustomize_agrees(tree: Path, variant: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: only the renderer above was used")
    out = subprocess.run(
        [kubectl, "kustomize", str(tree / variant)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    theirs = {(o["kind"], o["metadata"]["name"]): normalised(o) for o in yaml.safe_load_all(out)}
    ours = {(o["kind"], o["metadata"]["name"]): normalised(o) for o in render(tree / variant)}
    assert theirs == ours


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\nnamePrefix: x-\n")
    with pytest.raises(Unsupported, match="namePrefix"):
        render(tmp_path)
    with pytest.raises(Unsupported, match="directive"):
        merge({"a": {"b": 1}}, {"a": {"$patch": "delete"}})


def test_strategic_merge_of_named_lists() -> None:
    base = {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}], "args": ["x"]}
    patched = merge(base, {"env": [{"name": "B", "value": "3"}], "args": ["y"]})
    assert patched == {"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}],
                       "args": ["y"]}  # fmt: skip


# ------------------------------------------------------------------------------ schemas


@pytest.mark.parametrize("version", [OLDEST, kubernetes_validate.latest_version()])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_object_matches_the_api_schema(
    rendered: dict[str, list[Obj]], variant: str, version: str
) -> None:
    for obj in rendered[variant]:
        kubernetes_validate.validate(obj, version, strict=True)


def test_schema_check_catches_a_misspelt_field(rendered: dict[str, list[Obj]]) -> None:
    sts = copy.deepcopy(one(rendered["base"], "StatefulSet"))
    sts["spec"]["serviceNmae"] = sts["spec"].pop("serviceName")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(sts, OLDEST, strict=True)


# ------------------------------------------------------------------------------ invariants


@pytest.mark.parametrize("variant", VARIANTS)
def test_peers_statefulset_and_headless_service(
    rendered: dict[str, list[Obj]], variant: str
) -> None:
    objects = rendered[variant]
    sts = one(objects, "StatefulSet")
    svc = one(objects, "Service", sts["spec"]["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert sts["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    # Only the peers: the coordinator's pods must not answer the peers' names.
    job_labels = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
    assert not svc["spec"]["selector"].items() <= job_labels.items()

    c = container(sts)
    args = peer_args(objects)
    (port,) = svc["spec"]["ports"]
    assert port["port"] == port_of(c, port["targetPort"]) == listen_port(args)


@pytest.mark.parametrize("variant", VARIANTS)
def test_peer_identity_comes_from_the_ordinal(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    sts = one(objects, "StatefulSet")
    env = env_of(container(sts))
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert (
        env["PEER_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
        == "metadata.labels['apps.kubernetes.io/pod-index']"
    )
    args = peer_args(objects, ordinal=3, namespace="research")
    name = f"fedmoe-peer-3.{sts['spec']['serviceName']}.research.svc.cluster.local"
    advertised = flag(args, "--advertise")
    assert advertised == f"{name}:{listen_port(args)}"
    assert check_advertise(advertised) == advertised  # what the coordinator will accept
    parsed = build_parser().parse_args(args)
    assert parsed.command == "peer" and parsed.index == [3]

    # The member secret and checkpoints live on the pod's own claim.
    (template,) = sts["spec"]["volumeClaimTemplates"]
    mount = next(
        m for m in container(sts)["volumeMounts"] if m["name"] == template["metadata"]["name"]
    )
    assert Path(flag(args, "--state-dir")).is_relative_to(mount["mountPath"])
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_peers_reach_the_coordinator_service(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    job = one(objects, "Job")
    svc = one(objects, "Service", "fedmoe-coordinator")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()
    host, port = flag(peer_args(objects), "--coordinator").rsplit(":", 1)
    assert host == svc["metadata"]["name"]
    grpc_port = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    c = container(job)
    assert port_of(c, grpc_port["targetPort"]) == listen_port(coordinator_args(objects))
    metrics = next(p for p in svc["spec"]["ports"] if p["name"] == "metrics")
    assert port_of(c, metrics["targetPort"]) == int(
        flag(coordinator_args(objects), "--metrics-port")
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_peer_count_matches_replicas(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    args = coordinator_args(objects)
    parsed = build_parser().parse_args(args)
    assert parsed.command == "coordinator"
    assert parsed.peers == one(objects, "StatefulSet")["spec"]["replicas"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_join_token_secret_is_mounted_and_read(
    rendered: dict[str, list[Obj]], variant: str, tmp_path: Path
) -> None:
    objects = rendered[variant]
    secret = one(objects, "Secret")
    token = base64.b64decode(secret["data"]["join-token"]).decode()
    for obj, args in ((one(objects, "Job"), coordinator_args(objects)),
                      (one(objects, "StatefulSet"), peer_args(objects))):  # fmt: skip
        volume = next(v for v in pod_spec(obj)["volumes"] if "secret" in v)
        assert volume["secret"]["secretName"] == secret["metadata"]["name"]
        assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
        mount = next(m for m in container(obj)["volumeMounts"] if m["name"] == volume["name"])
        assert mount["readOnly"] is True
        assert flag(args, "--token-file") == f"{mount['mountPath']}/join-token"
    # --token-file reads the file as it is (the coordinator makes no token of its own then).
    path = tmp_path / "join-token"
    path.write_text(token)
    path.chmod(0o440)
    assert load_token(path) == TOKEN
    assert path.read_text() == token


@pytest.mark.parametrize("variant", VARIANTS)
def test_results_on_a_persistent_volume(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    job = one(objects, "Job")
    pvc = one(objects, "PersistentVolumeClaim", "fedmoe-results")
    volume = next(v for v in pod_spec(job)["volumes"] if "persistentVolumeClaim" in v)
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    mount = next(m for m in container(job)["volumeMounts"] if m["name"] == volume["name"])
    args = coordinator_args(objects)
    for where in ("--out", "--state-dir"):
        assert Path(flag(args, where)).is_relative_to(mount["mountPath"])


def test_gpus_only_in_the_overlay(rendered: dict[str, list[Obj]]) -> None:
    assert GPU not in yaml.safe_dump(rendered["base"])
    assert (
        env_of(container(one(rendered["base"], "StatefulSet")))["FEDMOE_DEVICE"]["value"] == "cpu"
    )
    sts = one(rendered["gpu"], "StatefulSet")
    c = container(sts)
    assert c["resources"]["limits"][GPU] == 1
    assert env_of(c)["FEDMOE_DEVICE"]["value"] == "cuda:0"
    assert flag(peer_args(rendered["gpu"]), "--device") == "cuda:0"
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in pod_spec(sts)[
        "tolerations"
    ]
    assert GPU not in yaml.safe_dump(one(rendered["gpu"], "Job"))
    # The patch changed only what it names: the rest of the peers' container is the base's.
    base_c = container(one(rendered["base"], "StatefulSet"))
    assert c["args"] == base_c["args"] and c["volumeMounts"] == base_c["volumeMounts"]
    assert env_of(c)["PEER_INDEX"] == env_of(base_c)["PEER_INDEX"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_coordinator_probes_use_grpc_health(rendered: dict[str, list[Obj]], variant: str) -> None:
    objects = rendered[variant]
    c = container(one(objects, "Job"))
    port = listen_port(coordinator_args(objects))
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == port
        assert "service" not in c[probe]["grpc"]  # "": the server-wide status it sets SERVING
    peer = container(one(objects, "StatefulSet"))
    assert peer["readinessProbe"]["tcpSocket"]["port"] == "expert"


@pytest.mark.parametrize("variant", VARIANTS)
def test_pods_are_hardened(rendered: dict[str, list[Obj]], variant: str) -> None:
    for obj in (o for o in rendered[variant] if o["kind"] in ("Job", "StatefulSet")):
        spec = pod_spec(obj)
        assert spec["automountServiceAccountToken"] is False
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 1000
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert "hostNetwork" not in spec and "hostPID" not in spec
        for c in spec["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["privileged"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 1000
            assert sc["capabilities"] == {"drop": ["ALL"]}
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys()
            # The image's entrypoint handles a non-root start (test below): no command override.
            assert "command" not in c
            # A read-only root: /tmp and HOME must be volumes.
            mounts = {m["mountPath"] for m in c["volumeMounts"] if not m.get("readOnly")}
            assert {"/tmp", "/home/fedmoe"} <= mounts


def test_entrypoint_runs_fedmoe_as_is_when_not_root(tmp_path: Path) -> None:
    """Under runAsNonRoot (uid 1000) docker/entrypoint.sh must exec `fedmoe "$@"` and nothing
    else: it writes nothing and needs no capability."""
    if os.getuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot drop to uid 1000")
    bindir = Path(tempfile.mkdtemp(prefix="fedmoe-k8s-entry-"))
    try:
        os.chmod(bindir, 0o755)
        fake = bindir / "fedmoe"
        fake.write_text('#!/bin/sh\necho "uid=$(id -u) args=$*"\n')
        fake.chmod(0o755)
        script = bindir / "entrypoint.sh"
        shutil.copy(ENTRYPOINT, script)
        script.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        drop = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"]
        cmd = [
            *(drop if os.getuid() == 0 else []),
            "sh",
            str(script),
            "coordinator",
            "--peers",
            "4",
        ]
        env = {"PATH": f"{bindir}:/usr/bin:/bin", "FEDMOE_RUN_DIR": "/nonexistent/not-made"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=30)
        assert done.returncode == 0, done.stderr
        uid = 1000 if os.getuid() == 0 else os.getuid()
        assert done.stdout.strip() == f"uid={uid} args=coordinator --peers 4"
        assert not Path("/nonexistent/not-made").exists()
    finally:
        shutil.rmtree(bindir)
