"""Glue to Triton Inference Server: the only importer of triton_python_backend_utils, the response pump, the stub watchdog."""
