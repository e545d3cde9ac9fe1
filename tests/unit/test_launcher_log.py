"""`tritonvl serve` logs the tritonserver command without the restricted APIs' key values."""

from tritonvl.handlers.tools.launcher import shown


def test_restricted_api_keys_are_masked_in_the_logged_command():
    cmd = ["tritonserver", "--http-restricted-api=model-repository,logging:tritonvl-admin-key=SECRET1",
           "--grpc-restricted-protocol", "model-config:tritonvl-admin-key=SECRET2", "--http-port", "8000"]
    logged = " ".join(shown(cmd))
    assert "SECRET" not in logged
    assert "--http-restricted-api=model-repository,logging:tritonvl-admin-key=***" in logged
    assert "--http-port 8000" in logged and shown(["a", "b=c"]) == ["a", "b=c"]
