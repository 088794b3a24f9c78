"""What a client of the service sends: the multipart body of an identity upload.

Used by tests/serve_helpers.py and bench/serve_load.py, which talk to `portrait serve` over
raw HTTP (http.client) so they measure and test the server, not a client library. The body is
hand-built because it is a dozen lines and the standard library has no multipart encoder
(httpx has one, but the bench keeps its HTTP path to the standard library).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

BOUNDARY = "portrait-client-boundary"


def upload_body(name: str, photos: Sequence[Path], boundary: str = BOUNDARY) -> tuple[bytes, dict[str, str]]:
    """POST /v1/identities: a `name` field and one `files` part per photo. Returns (body, headers)."""
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n{name}\r\n'.encode()]
    for p in photos:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="{Path(p).name}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + Path(p).read_bytes() + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), {"Content-Type": f"multipart/form-data; boundary={boundary}"}
