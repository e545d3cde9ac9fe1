"""Image and video URLs, only for hosts an operator allow-lists (`image_url_allowlist`; empty = off).

Rules, checked on the first URL and again on every redirect: http or https only, no user:password,
the host on the allow-list (``host`` or ``*.domain``), every address it resolves to public (no
loopback, private, link-local / cloud metadata, CGNAT, multicast or reserved ranges) unless the
operator says its allow-listed hosts live on a private network (`image_url_allow_private`). The
connection goes to the address that was checked (no second DNS lookup to rebind), with one
deadline for the whole fetch and a byte cap on the body.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
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


def public_address(text: str) -> bool:
    """True for a globally routable unicast address (IPv4-mapped IPv6 judged as its IPv4)."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_global and not (
        addr.is_multicast
        or addr.is_reserved
        or addr.is_loopback
        or addr.is_link_local
        or addr.is_private
        or addr.is_unspecified
    )


def resolve(host: str, port: int) -> list[str]:
    """All addresses of ``host`` (a seam for tests)."""
    return sorted({info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)})


def check(url: str, allowlist: tuple[str, ...], where: str, allow_private: bool = False) -> Target:
    """The URL's target if every rule holds, else InvalidArgument naming the rule."""
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
        addresses = resolve(host, port)
    except (OSError, UnicodeError) as exc:
        raise InvalidArgument(f"{where}: host {host!r} does not resolve ({exc})") from None
    blocked = [] if allow_private else [a for a in addresses if not public_address(a)]
    if blocked or not addresses:
        raise InvalidArgument(
            f"{where}: host {host!r} resolves to a non-public address {blocked[:1]} "
            "(private, loopback, link-local and metadata addresses are refused)"
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(url, scheme, host, port, path, addresses[0])


def fetch_image(url: str, where: str, limits, max_bytes: int | None = None, accept: str = "image/*") -> bytes:
    """The body of ``url`` (following at most MAX_REDIRECTS checked redirects), at most ``max_bytes``
    (default ``limits.max_bytes``) bytes, within ``limits.url_timeout_s`` seconds in all."""
    deadline = time.monotonic() + limits.url_timeout_s
    for _ in range(MAX_REDIRECTS + 1):
        target = check(url, limits.url_allowlist, where, limits.url_allow_private)
        try:
            status, headers, body = open_url(target, deadline, max_bytes or limits.max_bytes, where, accept)
        except TimeoutError:
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
    ``max_bytes`` is refused as soon as it is seen to be."""
    timeout = max(deadline - time.monotonic(), 0.001)
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
    try:
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
        while chunk := resp.read(_CHUNK):
            size += len(chunk)
            if size > max_bytes:
                raise InvalidArgument(f"{where}: the URL's body is over the {max_bytes}-byte limit")
            if time.monotonic() > deadline:  # a slow drip: each read is bounded by the socket timeout
                raise TimeoutError
            chunks.append(chunk)
        return resp.status, headers, b"".join(chunks)
    finally:
        conn.close()
