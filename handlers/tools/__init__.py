"""Tools around the server: the launcher (`tritonvl serve`), the offline pipeline, the tiny model."""
