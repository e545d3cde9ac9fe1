"""An allow-listed image URL is fetched and decoded through the real preprocess path, from a local
HTTP server the test runs. The server refuses loopback addresses (SSRF rule), so this one test
lets loopback count as public; end to end the refusals are in tests/server/test_generate_backend_and_urls.py."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_image, media_host

from tritonvl.handlers.params import typed
from tritonvl.handlers.preprocess import urlfetch
from tritonvl.handlers.preprocess.preprocessor import Preprocessor, RawRequest

PHOTO = make_image(96, 72, seed=5, fmt="JPEG")


@pytest.fixture
def image_host():
    with media_host({"/photo.jpg": (PHOTO, "image/jpeg")}) as host:
        yield host


def test_allow_listed_url_gives_the_same_pixels_as_the_bytes(model_dir, image_host, monkeypatch):
    port, hits = image_host
    monkeypatch.setattr(urlfetch, "public_address", lambda addr: True)  # loopback stands in for a public host
    pre = Preprocessor(str(model_dir), typed("preprocess", image_url_allowlist=("localhost",)))
    by_url = pre.process(RawRequest(text_input=b"What is it?", images=[f"http://localhost:{port}/photo.jpg".encode()]))
    by_bytes = pre.process(RawRequest(text_input=b"What is it?", images=[PHOTO]))
    assert hits == ["/photo.jpg"]
    np.testing.assert_array_equal(by_url.pixel_values, by_bytes.pixel_values)
    assert by_url.input_ids.tolist() == by_bytes.input_ids.tolist()
    from tritonvl.client.rules.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="HTTP 404"):
        pre.process(RawRequest(text_input=b"x", images=[f"http://localhost:{port}/missing.jpg".encode()]))
    with pytest.raises(InvalidArgument, match="not on the URL allow-list"):
        pre.process(RawRequest(text_input=b"x", images=[f"http://127.0.0.1:{port}/photo.jpg".encode()]))
