"""Response monitoring (issue 17): the safety head kept up to date while an answer is
decoded, so that an answer turning unsafe is stopped (docs/design.md §2).

After the prefill, the head's attention state is built from the prompt's states H. Each
decode step feeds one answer token anyway; the hook that captured H in the prefill
(decoder layer `config.layer` through the final norm) captures that token's state there
too, and `SafetyHead.step` appends it: an O(K d) update and the two safety-token dot
products per token, the prefix never re-read, no extra forward pass. p_unsafe of prompt +
answer so far is checked against the threshold every `every` tokens and at the answer's
end; the state grows at every token regardless. Checks are spaced because each one reads
p_unsafe back to the host (a device sync).

The monitor reads the adapter's response head at its threshold (`Casa.response_judge`:
a head trained on (prompt, response) records); an adapter without one lends its prompt head.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from casa_cli.backbone import Prefill
from casa_cli.head import HeadOutput, check_threshold, verdict
from casa_cli.inputs import InputError

ON_FLAG = ("refuse", "cut")


@dataclass
class MonitorOptions:
    every: int = 1  # check p_unsafe every this many answer tokens
    threshold: float | None = None  # p_unsafe at or above it stops the answer; None: the adapter's
    # refuse: the adapter's refusal text replaces the answer; cut: the answer keeps the
    # tokens before the flagged one
    on_flag: str = "refuse"
    # False: every check is made as usual but none stops the answer (stopped_at stays None):
    # `casa profile --monitor` times whole answers with the monitor's full cost
    stop: bool = True

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise InputError(f"monitor every {self.every!r}: expected a whole number of tokens from 1")
        if self.threshold is not None:
            check_threshold(self.threshold)
        if self.on_flag not in ON_FLAG:
            raise InputError(f"unknown on_flag {self.on_flag!r}; expected one of {', '.join(ON_FLAG)}")


class Monitor:
    """The safety head over prompt + answer, one answer token at a time.

    It follows the stream's last row: the user's own prompt (CoCA's principle rows come
    first; other rows are copies). A score that is not a finite probability fails closed
    as `head.verdict` does: ValueError, so the sample gets an error record, never an
    answer judged safe."""

    def __init__(self, casa, prefill: Prefill, options: MonitorOptions):
        self.backbone, self.every, self.stop = casa.backbone, options.every, options.stop
        # the adapter's response head when it has one (issue 17), else the prompt head
        self.head, threshold = casa.response_judge()
        self.threshold = threshold if options.threshold is None else options.threshold
        self.layer = casa.backbone.resolve_layer(casa.config.layer)
        self.state = self.head.attention_state(prefill.H[-1:], prefill.mask[-1:])
        self.latest: HeadOutput | None = None  # the head's output after the newest token
        self.answered = 0  # answer tokens appended to the state
        self.covered = 0  # answer tokens covered by the last check
        self.checks = 0
        self.p_unsafe_max: float | None = None  # None until a check
        self.stopped_at: int | None = None  # index of the flagged answer token
        self._captured: dict = {}

    @contextmanager
    def watching(self):
        """Within this block, every forward call leaves its new position's state at the
        head's layer for `advance` (the prefill's own capture hook)."""
        hook = self.backbone.capture_hook(self.layer, ["h"], self._captured)
        try:
            yield
        finally:
            hook.remove()

    def advance(self) -> bool:
        """Append the answer token the decode step just fed; True when a check is due and
        flags it."""
        h = self._captured.pop("h")[-1:, -1]  # (1, d): the last row, the one new position
        self.state, self.latest = self.head.step(self.state, h)
        self.answered += 1
        return self.answered % self.every == 0 and self._check()

    def finish(self) -> None:
        """Check the answer's last tokens if no check covered them (ended early, or its
        length is not a multiple of `every`)."""
        if self.stopped_at is None and self.answered > self.covered:
            self._check()

    def _check(self) -> bool:
        p_unsafe = float(self.latest.p_unsafe[0])
        flagged = verdict(p_unsafe, self.threshold) == "unsafe"  # raises when not finite
        self.checks, self.covered = self.checks + 1, self.answered
        self.p_unsafe_max = max(p_unsafe, self.p_unsafe_max or 0.0)
        if flagged and self.stop:
            self.stopped_at = self.answered - 1
        return flagged and self.stop

    def record(self) -> dict:
        """The generate record's "monitor" field."""
        return {"stopped_at": self.stopped_at,
                "p_unsafe_max": None if self.p_unsafe_max is None else round(self.p_unsafe_max, 6),
                "checks": self.checks}
