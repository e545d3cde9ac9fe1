"""One server configured two ways at once (one server start on a busy machine): the llm step on the
`generate` backend (transformers' generate() per request) and an image URL allow-list in preprocess.

- backend=generate is served and equals generate() token for token, streamed and not, with images.
- URLs end to end: a host off the allow-list is refused with INVALID_ARG naming the rule, and an
  allow-listed host that resolves to a loopback address is refused too (no private fetches) — in
  both cases the local image server the test runs never sees a request; the server stays ready.
"""

from __future__ import annotations

import pytest
from helpers import Reference, infer_http, joined, make_image, media_host, stream_grpc

PHOTO = make_image(96, 72, seed=5, fmt="JPEG")


@pytest.fixture(scope="module")
def srv(model_dir):
    from tritonvl.handlers.tools.launcher import ServerProcess

    log = "/tmp/tritonvl-test-genurl.log"  # kept after the run (pytest rotates its tmp dirs)
    overrides = {"llm": {"backend": "generate"}, "preprocess": {"image_url_allowlist": "localhost"}}
    with ServerProcess(str(model_dir), log_path=log, overrides=overrides, ready_timeout=600) as s:
        yield s


@pytest.fixture(scope="module")
def ref(model_dir):
    return Reference(str(model_dir))


@pytest.fixture
def image_host():
    """A local HTTP server with /photo.jpg; counts the requests it gets."""
    with media_host({"/photo.jpg": (PHOTO, "image/jpeg")}) as host:
        yield host


def test_generate_backend_is_served_and_equals_generate(srv, ref):
    img = make_image(84, 56, seed=9)
    one = infer_http(srv.http_url, text_input="Describe it.", image=[img], max_tokens=7, temperature=0.0,
                     exclude_input_in_output=True)
    streamed = joined(stream_grpc(srv.grpc_url, text_input="And now?", max_tokens=6, temperature=0.0, stream=True))
    assert one["output_ids"] == ref.generate("Describe it.", [img], max_tokens=7)
    assert streamed["output_ids"] == ref.generate("And now?", max_tokens=6)


def url_error(srv, url: str) -> str:
    """The error of a request with an image URL: HTTP 400 is Triton's INVALID_ARG."""
    with pytest.raises(RuntimeError) as info:
        infer_http(srv.http_url, text_input="What is it?", image=[url], max_tokens=2)
    assert str(info.value).startswith("HTTP 400:"), info.value
    return str(info.value)


def test_url_off_the_allow_list_is_refused(srv, image_host):
    port, hits = image_host
    msg = url_error(srv, f"http://127.0.0.1:{port}/photo.jpg")
    assert "image[0]: host '127.0.0.1' is not on the URL allow-list (image_url_allowlist)" in msg, msg
    assert hits == []


def test_allow_listed_host_on_a_loopback_address_is_refused(srv, image_host):
    port, hits = image_host
    msg = url_error(srv, f"http://localhost:{port}/photo.jpg")
    assert "non-public address" in msg, msg
    assert hits == []


def test_server_still_serves_after_url_refusals(srv):
    out = infer_http(srv.http_url, text_input="Hi", image=[PHOTO], max_tokens=2, exclude_input_in_output=True)
    assert out["num_output_tokens"] == 2
