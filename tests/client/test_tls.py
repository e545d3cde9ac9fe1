"""The client behind an authenticating TLS proxy (docs/SECURITY.md): https:// and gRPC TLS really use TLS
(the proxies only speak TLS), headers reach the proxy, a missing one is refused, an untrusted
certificate is a one-line error; and a client pointed at the other protocol's port fails in one line."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest
from tls_proxy import GrpcTlsProxy, HttpTlsProxy, make_certificates

from tritonvl.client import AsyncClient, Client, ServerUnavailable, TritonVLError

TOKEN = "Bearer s3cret"
ASK = {"max_tokens": 5, "temperature": 0.0}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certificates(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def proxies(server, certs):
    ca, cert, key = certs
    http = HttpTlsProxy(server.http_url, cert, key, "Authorization", TOKEN)
    grpc = GrpcTlsProxy(server.grpc_url, cert, key, "Authorization", TOKEN)
    yield {"http": f"https://localhost:{http.port}", "grpc": f"localhost:{grpc.port}", "ca": str(ca),
           "proxy": {"http": http, "grpc": grpc}}
    http.close()
    grpc.close()


@pytest.fixture(scope="module")
def plain(server):
    with Client(server.grpc_url, "grpc", timeout=120) as c:
        return c.generate("Through a proxy.", **ASK).output_ids


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_tls_with_the_header_is_served(proxies, plain, protocol):
    before = proxies["proxy"][protocol].refused
    with Client(proxies[protocol], protocol, timeout=120, tls=protocol == "grpc", ca_file=proxies["ca"],
                headers={"Authorization": TOKEN}) as client:
        client.check_ready()
        assert client.generate("Through a proxy.", **ASK).output_ids == plain
        assert list(client.stream("Through a proxy.", **ASK)) and proxies["proxy"][protocol].refused == before


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_async_client_over_tls(proxies, plain, protocol):
    async def run():
        async with AsyncClient(proxies[protocol], protocol, timeout=120, tls=True, ca_file=proxies["ca"],
                               headers={"Authorization": TOKEN}) as client:
            return (await client.generate("Through a proxy.", **ASK)).output_ids

    assert asyncio.run(run()) == plain


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_without_the_header_the_proxy_refuses(proxies, protocol):
    before = proxies["proxy"][protocol].refused
    with Client(proxies[protocol], protocol, timeout=60, tls=True, ca_file=proxies["ca"]) as client:
        with pytest.raises(TritonVLError):
            client.generate("No credential.", **ASK)
    assert proxies["proxy"][protocol].refused > before


def test_an_untrusted_certificate_is_one_line(proxies):
    with Client(proxies["http"], "http", timeout=30, headers={"Authorization": TOKEN}) as client:  # system roots
        with pytest.raises(ServerUnavailable, match="certificate is not trusted"):
            client.generate("Hello", **ASK)


def test_cli_over_tls_with_a_header(proxies, tmp_path):
    from helpers import make_image

    image = tmp_path / "a.png"
    image.write_bytes(make_image(64, 48, seed=1))
    base = [sys.executable, "-m", "tritonvl.client.cli", "describe", str(image), "--url", proxies["http"],
            "--ca-file", proxies["ca"], "--max-tokens", "3"]
    ok = subprocess.run(base + ["--header", f"Authorization: {TOKEN}"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    refused = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr


def test_http_client_on_the_grpc_port_is_one_line(server, tmp_path):
    from helpers import make_image

    with Client(server.grpc_url, "http", timeout=10) as client:
        with pytest.raises(ServerUnavailable, match="gRPC port"):
            client.generate("Hello", **ASK)
        with pytest.raises(ServerUnavailable, match="gRPC port"):
            client.check_ready()
    image = tmp_path / "a.png"
    image.write_bytes(make_image(64, 48, seed=1))
    cli = subprocess.run([sys.executable, "-m", "tritonvl.client.cli", "describe", str(image), "--url",
                          f"http://{server.grpc_url}", "--max-tokens", "2"], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1 and "Traceback" not in cli.stderr and "gRPC port" in cli.stderr, cli.stderr
    assert len(cli.stderr.strip().splitlines()) == 1, cli.stderr


def test_grpc_client_on_the_http_port_is_one_line(server):
    with Client(server.http_url, "grpc", timeout=10) as client:
        with pytest.raises(TritonVLError) as err:
            client.generate("Hello", **ASK)
    assert "\n" not in str(err.value), err.value
