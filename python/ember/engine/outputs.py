"""What the engine hands back, in vLLM's shape: ``RequestOutput.outputs[0].text``."""

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """The generated part of a request (cumulative: everything generated so far).

    finish_reason: None while running, then "stop" (EOS, a stop token or a stop string),
    "length" (max_tokens or the model's context) or "abort". stop_reason: the stop token id or
    stop string that ended it (None for EOS and length).
    """

    index: int
    text: str
    token_ids: list
    finish_reason: str | None = None
    stop_reason: int | str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    """Wall-clock times (``time.perf_counter()``) of a request's life."""

    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        if self.first_token_time is None:
            return None
        return self.first_token_time - self.arrival_time


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list
    outputs: list = field(default_factory=list)
    finished: bool = False
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: RequestMetrics | None = None
