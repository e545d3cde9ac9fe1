"""Test-only TLS-terminating proxies that demand a header, as docs/SECURITY.md tells operators to put in
front of Triton: one for HTTP/1.1 (asyncio + ssl, checks every request's headers) and one for gRPC
(grpcio server with TLS credentials, checks the call's metadata, forwards raw bytes). Plus a
self-signed CA and a ``localhost`` certificate made with ``cryptography``."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl
import threading
from pathlib import Path


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, server.pem, server.key): a CA and a certificate for localhost / 127.0.0.1 signed by it."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tritonvl test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    paths = directory / "ca.pem", directory / "server.pem", directory / "server.key"
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(cert.public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


class HttpTlsProxy:
    """TLS on a local port -> plain HTTP upstream; a request without ``header: value`` gets 401."""

    def __init__(self, upstream: str, cert: Path, key: Path, header: str, value: str) -> None:
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.need = (header.lower(), value)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(cert, key)
        self.refused = 0
        self.loop = asyncio.new_event_loop()
        self.port = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.context))
        self.port = server.sockets[0].getsockname()[1]
        self.server = server
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = None
        try:
            up_reader, upstream = await asyncio.open_connection(self.upstream_host, self.upstream_port)
            pump = asyncio.ensure_future(self._copy(up_reader, writer))
            while True:  # one HTTP/1.1 request at a time (keep-alive): headers checked, body passed on
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                fields = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
                if fields.get(self.need[0]) != self.need[1]:
                    self.refused += 1
                    body = b'{"error":"missing credential"}'
                    writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
                    await writer.drain()
                    break
                upstream.write(head + await reader.readexactly(int(fields.get("content-length", 0))))
                await upstream.drain()
            pump.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()

    @staticmethod
    async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        def stop() -> None:
            self.server.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(stop)
        self.thread.join(10)


class GrpcTlsProxy:
    """TLS gRPC on a local port -> plain gRPC upstream, any method, raw bytes; a call whose metadata
    lacks ``header: value`` ends UNAUTHENTICATED."""

    def __init__(self, upstream: str, cert: Path, key: Path, header: str, value: str) -> None:
        from concurrent import futures

        import grpc

        self.grpc = grpc
        self.need = (header.lower(), value)
        self.refused = 0
        self.channel = grpc.insecure_channel(upstream)
        proxy = self

        class Forward(grpc.GenericRpcHandler):
            def service(self, details):
                method = details.method
                upstream_call = proxy.channel.stream_stream(method)  # raw bytes both ways

                def handle(requests, context):
                    if dict(context.invocation_metadata()).get(proxy.need[0]) != proxy.need[1]:
                        proxy.refused += 1
                        context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing credential")
                    call = upstream_call(requests)
                    context.add_callback(call.cancel)
                    yield from call

                return grpc.stream_stream_rpc_method_handler(handle)

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8), handlers=[Forward()])
        creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
        self.port = self.server.add_secure_port("127.0.0.1:0", creds)
        self.server.start()

    def close(self) -> None:
        self.server.stop(grace=None)
        self.channel.close()
