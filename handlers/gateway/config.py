"""The gateway's settings (one object; the CLI and tests build it)."""

from __future__ import annotations

from dataclasses import dataclass

API_KEY_ENV = "TRITONVL_API_KEY"  # vLLM's VLLM_API_KEY habit


@dataclass(frozen=True)
class GatewayConfig:
    triton_url: str = "localhost:8001"  # Triton's gRPC HOST:PORT
    triton_model: str = "qwen2_5_vl"  # the public model on that server
    served_model_names: tuple[str, ...] = ()  # what /v1/models lists and requests may name
    max_body_bytes: int = 64 * 2**20  # larger request bodies get 413
    max_concurrent: int = 512  # requests in flight beyond this get 429 at once
    request_timeout_s: float = 600.0  # the gRPC deadline of one generation
    describe_prompt: str = "Describe this image."  # /describe-image/ without a prompt
    describe_video_prompt: str = "Describe this video."  # the same, for a video upload
    api_keys: tuple[str, ...] = ()  # requests must send one as 'Authorization: Bearer <key>'; () = open

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024 or self.max_concurrent < 1 or self.request_timeout_s <= 0:
            raise ValueError("max_body_bytes >= 1024, max_concurrent >= 1 and request_timeout_s > 0 are required")
        for i, key in enumerate(self.api_keys):
            # never in the message: the key itself
            if not key or not all("!" <= c <= "~" for c in key):
                raise ValueError(f"API key #{i + 1}: empty, or a character other than printable ASCII "
                                 "(no spaces): a client could not send it in an Authorization header")

    @property
    def names(self) -> tuple[str, ...]:
        """Served names: the first is the default and the one answers carry."""
        return self.served_model_names or (self.triton_model,)


def api_keys(flags: list[str] | None, env: str | None) -> tuple[str, ...]:
    """The keys: the ``--api-key`` flags if any, else $TRITONVL_API_KEY, one key per line (a Secret
    may hold several during a rotation; blank lines and the spaces around a key are dropped, so a
    trailing newline of a file-made Secret does no harm)."""
    if flags:
        return tuple(k.strip() for k in flags)
    return tuple(k.strip() for k in (env or "").splitlines() if k.strip())


def served_names(model: str | None, served_model_name: list[str] | None, triton_model: str) -> tuple[str, ...]:
    """vLLM's rule: ``--served-model-name`` if given, else ``--model`` as given, else the Triton model."""
    if served_model_name:
        return tuple(served_model_name)
    return (model,) if model else (triton_model,)
