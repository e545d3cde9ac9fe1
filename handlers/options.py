"""What one request asks of the llm step (sampling and response options), carried as JSON between steps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from tritonvl.handlers.sampling import SamplingParams


@dataclass
class RequestOptions:
    sampling: SamplingParams
    stream: bool = False
    exclude_input_in_output: bool = False
    prompt_text: str = ""

    def to_json(self) -> str:
        return json.dumps({"sampling": asdict(self.sampling), "stream": self.stream,
                           "exclude_input_in_output": self.exclude_input_in_output,
                           "prompt_text": self.prompt_text})

    @classmethod
    def from_json(cls, text: str | bytes) -> RequestOptions:
        d = json.loads(text)
        return cls(SamplingParams(**d["sampling"]), d["stream"], d["exclude_input_in_output"], d["prompt_text"])
