"""tritonvl client: talk to a tritonvl (Qwen2.5-VL on Triton) server. Installs without torch."""
