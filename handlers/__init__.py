"""Server-side logic of tritonvl: everything behind the Triton models, importable without Triton.

Only :mod:`tritonvl.handlers.triton_adapter` imports ``triton_python_backend_utils``.
"""
