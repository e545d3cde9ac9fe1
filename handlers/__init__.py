"""Server-side logic of tritonvl: everything behind the Triton models, importable without Triton.

Only :mod:`tritonvl.handlers.tritonserver.adapter` imports ``triton_python_backend_utils``.
"""
