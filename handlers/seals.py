"""Seals: the internal models accept only inputs that this server's own models produced.

Triton serves every model it loads to every client, so `vision_encoder` and `llm` can be called
directly, bypassing `preprocess` (issue 24). Each step therefore seals what it hands on with an HMAC
under a per-server secret, and the next step checks the seal over what it received:

- preprocess: ``pixel_seal`` over (pixel_values, image_grid_thw) for the vision step, and
  ``request_seal`` over (input_ids, image_grid_thw, request) for the llm;
- vision_encoder: checks ``pixel_seal``; ``embeds_seal`` over (image_embeds, image_grid_thw);
- llm: checks ``request_seal`` and ``embeds_seal``.

A caller can only replay what the pipeline computed for inputs it sent through preprocess: the same
as an ordinary request. Both the public front and the ensemble carry the seals, so both keep working.
The secret is 32 random bytes in a 0600 file of the server's own registry directory
(``$TMPDIR/tritonvl-stubs-<server pid>-<start time>/``, tritonserver/watchdog.py), made by whichever
stub needs it first; the stubs of one tritonserver share it, nothing outside the machine can read it.
Parameter ``internal_inputs=open`` (vision_encoder, llm) skips the checks: direct calls for debugging.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import tempfile
from pathlib import Path

import numpy as np

from tritonvl.client.rules.errors import InvalidArgument

SEAL_BYTES = 32
KEY_FILE = "pipeline.key"


def server_dir(server_pid: int | None = None) -> Path:
    """The registry directory of the tritonserver this stub belongs to (its parent process)."""
    pid = server_pid or os.getppid()
    try:
        start = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        start = "0"
    return Path(tempfile.gettempdir()) / f"tritonvl-stubs-{pid}-{start}"


def load_key(directory: Path | None = None) -> bytes:
    """The server's secret, made on first use (atomically: a complete file is linked into place)."""
    d = directory or server_dir()
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    if d.stat().st_uid != os.getuid():
        raise PermissionError(f"{d} belongs to another user: refusing to keep the pipeline key there")
    path = d / KEY_FILE
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".key-")  # mode 0600
        try:
            os.write(fd, secrets.token_bytes(32))
            os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another stub was first: use its key
        finally:
            os.unlink(tmp)
    key = path.read_bytes()
    if len(key) != 32 or path.stat().st_uid != os.getuid():
        raise PermissionError(f"{path}: not a pipeline key of this user")
    return key


class Sealer:
    """Seals and checks with one server's key. ``enforce`` false (``internal_inputs=open``): checks pass."""

    def __init__(self, key: bytes, enforce: bool = True) -> None:
        self.key, self.enforce = key, enforce

    def seal(self, kind: str, *parts) -> np.ndarray:
        """UINT8 [SEAL_BYTES] over ``kind`` and each part (an array: its dtype, shape and bytes; or bytes)."""
        mac = hmac.new(self.key, kind.encode(), hashlib.sha256)
        for part in parts:
            if isinstance(part, np.ndarray):
                arr = np.ascontiguousarray(part)
                mac.update(f"|{arr.dtype.str}{arr.shape}|".encode())
                if arr.dtype == np.object_:
                    mac.update(b"".join(x if isinstance(x, bytes) else str(x).encode() for x in arr.reshape(-1)))
                elif arr.size:
                    mac.update(memoryview(arr).cast("B"))
            else:
                mac.update(b"|bytes|" + (part if isinstance(part, bytes) else str(part).encode()))
        return np.frombuffer(mac.digest(), dtype=np.uint8)

    def check(self, seal: np.ndarray | None, kind: str, *parts, what: str) -> None:
        """INVALID_ARG unless ``seal`` is this server's seal of the parts."""
        if not self.enforce:
            return
        if seal is None:
            raise InvalidArgument(f"{kind}_seal: missing; {what} takes only inputs this server's pipeline made "
                                  "(send requests to the public model; parameter internal_inputs=open allows "
                                  "direct calls)")
        expected = self.seal(kind, *parts).tobytes()
        if not hmac.compare_digest(np.asarray(seal, dtype=np.uint8).reshape(-1).tobytes(), expected):
            raise InvalidArgument(f"{kind}_seal: does not match; {what} takes only inputs this server's pipeline "
                                  "made (parameter internal_inputs=open allows direct calls)")
