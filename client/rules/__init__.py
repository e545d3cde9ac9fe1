"""The rules client and server share, in one torch-free package: request errors and their codes
(``errors``), the sampling fields and their ranges (``sampling``), stop-string matching (``stops``) and
structured-output request parsing (``structured``). The server's handlers import nothing else from
``tritonvl.client`` (the gateway excepted: it is a Triton client)."""
