"""The OpenAI-compatible gateway: FastAPI + uvicorn in front of Triton's gRPC streaming API.

``/v1/chat/completions`` (images as ``image_url`` parts, videos as ``video_url`` / ``video`` parts), ``/v1/completions`` (raw prompt),
``/v1/models``, ``/health``, ``/metrics`` and the upload endpoint ``/describe-image/``. It imports
no torch: a gateway pod fronting remote Triton pods needs only the ``gateway`` extra.
"""
