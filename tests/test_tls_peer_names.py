"""Under mutual TLS a peer checks the expert source by its node name (peer-K), not by the address
it advertised: certificates made before the addresses are known (containers) still verify, and
an endpoint hosting several peers answers with the certificate of the one asked for (SNI)."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest

from fedmoe.common.accounting import ByteCounter
from fedmoe.common.grpc_options import SERVER_OPTIONS
from fedmoe.common.tensors import TensorSpec, numpy_to_wire
from fedmoe.common.tls import add_port, load_tls, make_certs
from fedmoe.peer.expert_client import ExpertClient
from fedmoe.peer.expert_service import ExpertExchangeService, add_expert_exchange
from fedmoe.peer.expert_store import ExpertStore


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    # No host at all: each certificate is valid for its node name only, as for a container
    # whose address nobody knew when the certificates were made.
    make_certs(d, ["peer-0", "peer-1", "peer-2", "peer-3"], hosts=[])
    return d


@pytest.fixture()
def two_hosted(certs: Path):  # type: ignore[no-untyped-def]
    """One endpoint hosting peer-0 and peer-1, each with experts ordered by peer-2."""
    service = ExpertExchangeService(hosted=2)
    for k in (0, 1):
        store = ExpertStore(wait_timeout=5)
        w = np.full(4, float(k), np.float32)
        store.publish(1, {0: [numpy_to_wire("experts.0.w", w)]}, 4096)
        store.set_orders(1, {"peer-2": ([0], "ticket")})
        service.add_peer(f"peer-{k}", store, ByteCounter())
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=SERVER_OPTIONS)
    add_expert_exchange(server, service)
    port = add_port(server, "127.0.0.1:0", load_tls(certs, "peer-0"), [load_tls(certs, "peer-1")])
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def fetch(certs: Path, address: str, source: str) -> float:
    client = ExpertClient(ByteCounter(), timeout=10, tls=load_tls(certs, "peer-2"))
    try:
        expected = {"experts.0.w": TensorSpec((4,), frozenset(range(16)))}
        got = client.fetch(address, "peer-2", 1, [0], expected, "ticket", source_id=source)
        return float(np.frombuffer(got["experts.0.w"].data, np.float32)[0])
    finally:
        client.close()


def test_each_hosted_peer_answers_under_its_own_name(certs: Path, two_hosted: str) -> None:
    # 127.0.0.1 is in no certificate: only the node name makes these verify.
    assert fetch(certs, two_hosted, "peer-0") == 0.0
    assert fetch(certs, two_hosted, "peer-1") == 1.0


def test_an_endpoint_without_the_named_certificate_is_refused(certs: Path, two_hosted: str) -> None:
    # peer-3's certificate is signed by the same CA, but this endpoint does not hold it: a peer
    # that advertised someone else's address cannot pass for peer-3.
    with pytest.raises(grpc.RpcError) as info:
        fetch(certs, two_hosted, "peer-3")
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
