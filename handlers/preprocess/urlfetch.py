"""Image and video URLs, only for hosts an operator allow-lists (`image_url_allowlist`; empty = off).

Rules, checked on the first URL and again on every redirect: http or https only, no user:password,
the host on the allow-list (``host`` or ``*.domain``), every address it resolves to public (no
loopback, private, link-local / cloud metadata, CGNAT, multicast or reserved ranges). Two operator
switches widen that, never to link-local, metadata, unspecified, multicast or reserved addresses:
`image_url_allow_private` lets allow-listed hosts live on a private network (RFC 1918, IPv6
unique-local), `image_url_allow_loopback` lets them be this machine (tests, a local media server).
The connection goes to the address that was checked (no second DNS lookup to rebind), with one
deadline for the whole fetch (name lookup, connect, TLS, headers and body of every redirect: each
socket wait gets only the time left) and a byte cap on the body.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from tritonvl.client.rules.errors import InvalidArgument

MAX_REDIRECTS = 3
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Target:
    url: str
    scheme: str
    host: str
    port: int
    path: str  # path and query, as sent in the request line
    address: str  # the checked IP the connection must use


def host_allowed(host: str, allowlist: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowlist:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:]) and host != entry[2:]):
            return True
    return False


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address, an IPv6 form that carries an IPv4 one (mapped, NAT64, 6to4) judged as that IPv4."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return addr.ipv4_mapped
        if addr in _NAT64 or addr in _NAT64_LOCAL:  # 64:ff9b::a9fe:a9fe reaches 169.254.169.254
            return ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)
        if addr.sixtofour is not None:
            return addr.sixtofour
    return addr


_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
# what image_url_allow_private opens: RFC 1918 and IPv6 unique-local, less the cloud metadata in them
_PRIVATE = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
_METADATA = (ipaddress.ip_address("fd00:ec2::254"),)  # AWS's IPv6 instance metadata (inside fc00::/7)


def public_address(text: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    addr = _ip(text)
    return addr.is_global and not (
        addr.is_multicast
        or addr.is_reserved
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_private
        or addr.is_unspecified
    )


def address_kind(text: str) -> str:
    """public, private (RFC 1918, IPv6 unique-local), loopback, or what is never fetched: metadata,
    link-local, unspecified, multicast, reserved or another non-public range (CGNAT, documentation, ...)."""
    if public_address(text):
        return "public"
    addr = _ip(text)
    for kind, hit in (("metadata", addr in _METADATA), ("link-local", addr.is_link_local),
                      ("unspecified", addr.is_unspecified), ("multicast", addr.is_multicast),
                      ("loopback", addr.is_loopback), ("reserved", addr.is_reserved),
                      ("private", any(addr in net for net in _PRIVATE if net.version == addr.version))):
        if hit:
            return kind
    return "non-public"


def allowed_address(text: str, allow_private: bool = False, allow_loopback: bool = False) -> bool:
    """Public, or what the operator's switches open: RFC 1918 / unique-local (``allow_private``),
    loopback (``allow_loopback``). Link-local (169.254.0.0/16 with 169.254.169.254, fe80::/10),
    metadata, unspecified, multicast, reserved and other non-public addresses are never allowed."""
    kind = address_kind(text)
    return kind == "public" or (kind == "private" and allow_private) or (kind == "loopback" and allow_loopback)


_WHY = {"private": "refused unless image_url_allow_private", "loopback": "refused unless image_url_allow_loopback "
        "(for tests and a media server on this machine)"}


def resolve(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (a seam for tests)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def resolve_by(host: str, port: int, deadline: float | None) -> list[str]:
    """``resolve`` within the fetch's deadline: getaddrinfo has no timeout of its own, so it runs on
    a daemon thread that is left behind (it ends when the resolver gives up) if the deadline passes."""
    if deadline is None:
        return resolve(host, port)
    box: list = []
    thread = threading.Thread(target=lambda: box.append(_call(resolve, host, port)), daemon=True)
    thread.start()
    thread.join(max(deadline - time.monotonic(), 0))
    if not box:
        raise TimeoutError
    ok, value = box[0]
    if not ok:
        raise value
    return value


def _call(fn, *args):
    try:
        return True, fn(*args)
    except BaseException as exc:  # noqa: BLE001 -- handed to the waiting thread
        return False, exc


def check(url: str, allowlist: tuple[str, ...], where: str, allow_private: bool = False,
          allow_loopback: bool = False, deadline: float | None = None) -> Target:
    """The URL's target if every rule holds, else InvalidArgument naming the rule (TimeoutError when
    the name lookup outlasts ``deadline``)."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        raise InvalidArgument(f"{where}: not a valid URL ({exc})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise InvalidArgument(f"{where}: {scheme} URLs are not accepted (http and https only)")
    if parts.username is not None or parts.password is not None:
        raise InvalidArgument(f"{where}: URLs with user credentials are not accepted")
    host = parts.hostname or ""
    if not host_allowed(host, allowlist):
        raise InvalidArgument(f"{where}: host {host!r} is not on the URL allow-list (image_url_allowlist)")
    try:
        addresses = resolve_by(host, port, deadline)
    except TimeoutError:
        raise
    except (OSError, UnicodeError) as exc:
        raise InvalidArgument(f"{where}: host {host!r} does not resolve ({exc})") from None
    blocked = [a for a in addresses if not allowed_address(a, allow_private, allow_loopback)]
    if blocked or not addresses:
        kind = address_kind(blocked[0]) if blocked else "no"
        raise InvalidArgument(
            f"{where}: host {host!r} resolves to a non-public address {blocked[:1]} "
            f"({kind}: {_WHY.get(kind, 'always refused')}; link-local and metadata addresses are never fetched)"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port, path, addresses[0])


def fetch_image(url: str, where: str, limits, max_bytes: int | None = None, accept: str = "image/*") -> bytes:
    """The body of ``url`` (following at most MAX_REDIRECTS checked redirects), at most ``max_bytes``
    (default ``limits.max_bytes``) bytes, within ``limits.url_timeout_s`` seconds in all."""
    deadline = time.monotonic() + limits.url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        try:
            target = check(url, limits.url_allowlist, where, limits.url_allow_private,
                           getattr(limits, "url_allow_loopback", False), deadline)
            status, headers, body = open_url(target, deadline, max_bytes or limits.max_bytes, where, accept)
        except (TimeoutError, socket.timeout):
            raise InvalidArgument(
                f"{where}: fetching the URL took longer than {limits.url_timeout_s:g} s"
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise InvalidArgument(f"{where}: could not fetch the URL ({type(exc).__name__}: {exc})") from None
        if status in (301, 302, 303, 307, 308):
            if not headers.get("location"):
                raise InvalidArgument(f"{where}: redirect without a Location")
            url = urljoin(url, headers["location"])
            continue
        if status != 200:
            raise InvalidArgument(f"{where}: the URL answered HTTP {status}")
        return body
    raise InvalidArgument(f"{where}: more than {MAX_REDIRECTS} redirects")


def open_url(target: Target, deadline: float, max_bytes: int, where: str,
             accept: str = "image/*") -> tuple[int, dict, bytes]:
    """One GET to the checked address: (status, lower-case headers, body); a body over
    ``max_bytes`` is refused as soon as it is seen to be; TimeoutError once ``deadline`` passes,
    however slowly the server drips its headers or body."""
    timeout = _left(deadline)
    if target.scheme == "https":
        conn = http.client.HTTPSConnection(
            target.host, target.port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout)
    # connect to the address that was checked; TLS still verifies the certificate for the host name
    conn._create_connection = lambda addr, *a, **k: socket.create_connection(
        (target.address, addr[1]), *a, **k
    )
    resp = None
    try:
        conn.connect()  # connect and TLS handshake: each bounded by the time left
        conn.sock = _DeadlineSocket(conn.sock, deadline)  # every later send and receive too
        conn.request("GET", target.path, headers={"Accept": accept, "User-Agent": "tritonvl"})
        resp = conn.getresponse()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        if resp.status != 200:
            return resp.status, headers, b""
        if int(headers.get("content-length", "0") or 0) > max_bytes:
            raise InvalidArgument(
                f"{where}: the URL's body of {headers['content-length']} bytes is over the "
                f"{max_bytes}-byte limit"
            )
        chunks, size = [], 0
        while chunk := resp.read1(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise InvalidArgument(f"{where}: the URL's body is over the {max_bytes}-byte limit")
            chunks.append(chunk)
        return resp.status, headers, b"".join(chunks)
    finally:
        if resp is not None:
            resp.close()
        conn.close()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


class _DeadlineSocket:
    """A connected socket whose every wait ends at one deadline: http.client reads headers and body
    through ``makefile``, whose reads each wait up to the socket's timeout, so a server that sends a
    byte just before each timeout kept a fetch going far past a plain per-read timeout."""

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self._sock, self._deadline = sock, deadline

    def __getattr__(self, name):
        return getattr(self._sock, name)

    def _bounded(self) -> socket.socket:
        self._sock.settimeout(_left(self._deadline))
        return self._sock

    def sendall(self, data, *args):
        return self._bounded().sendall(data, *args)

    def recv_into(self, buffer, *args):
        return self._bounded().recv_into(buffer, *args)

    def makefile(self, mode="r", *args, **kwargs):
        """What socket.makefile("rb") builds, reading through this wrapper: the socket's file count
        goes up, so closing the connection (http.client does when the response will close it) leaves
        the descriptor open until the response's file is closed too."""
        self._sock._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))
