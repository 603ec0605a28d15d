"""What the driver asks of the teachers: a `Request` is one prompt asked of one teacher (it travels to a replica,
a Ray actor, in a batch), and a `BestOfPrompt` is a prompt asked of several, whose answers the selector compares.
A prompt a teacher or the selector will not answer becomes a `Rejected`, with the input file and line the request
carries, so that its dead letter names where it came from."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from avocado_ray.dataplane.prompts import Rejected


@dataclass
class Request:
    """One prompt asked of one teacher, as the replica reads it."""

    prompt_id: str
    domain: str
    labels: list[str]
    messages: list[dict]
    file: str | None = None  # the input row's origin, for its dead letter
    line: int = 0
    sampling: dict | None = None  # the row's sampling overrides
    attempts: int = 0  # calls that raised on it so far (teachers.pool)

    def rejected(self, reason: str, code: str) -> Rejected:
        """Its dead letter: `reason` and `code` (see `Rejected.code`), at the input row it came from."""
        return Rejected(self.line, self.prompt_id, reason, code, self.file)

    def tried(self) -> Request:
        """A copy with one more failed attempt counted."""
        return replace(self, attempts=self.attempts + 1)


@dataclass
class BestOfPrompt:
    """A prompt asked of several teachers; the selector keeps the best answer by the domain's scorer."""

    request: Request
    teachers: list[str] = field(default_factory=list)
    tests: str | None = None  # Python asserts for the code_tests scorer
