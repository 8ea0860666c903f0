"""A deterministic engine for orchestration tests (never used by acceptance tests).

It answers from the stamp's pixels alone, so the same stamp always gets the same
answer, and it appends one line per answered stamp to ``$GLUE_VLM_TEST_CALL_LOG`` (if
set) before returning, so tests can count engine calls across processes.
"""

from __future__ import annotations

import hashlib
import os
import time

import numpy as np

from glue_vlm.backends.base import Backend, BackendError, Prediction


def pixel_digest(pixels: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(pixels).data).hexdigest()[:16]


def expected_answer(pixels: np.ndarray, labels: list[str]) -> tuple[str, dict[str, float]]:
    """What ``CountingBackend`` answers for these pixels."""
    seed = int(pixel_digest(pixels), 16) % (2**32)
    weights = np.random.default_rng(seed).random(len(labels)) + 0.1
    probs = weights / weights.sum()
    return labels[int(np.argmax(probs))], dict(zip(labels, probs.tolist()))


class CountingBackend(Backend):
    name = "counting"
    accepts = "array"
    gives_probabilities = True

    def __init__(self, model: str = "counting-v1", batch_size: int = 4, delay: float = 0.0,
                 fail_rows: tuple[int, ...] = (), fatal_after: int | None = None, **_ignored):
        self.model = model
        self.batch_size = int(batch_size)
        self.delay = float(os.environ.get("GLUE_VLM_TEST_DELAY", delay))
        self.fail_rows = set(fail_rows)
        self.fatal_after = fatal_after
        self.calls: list[int] = []  # catalog rows answered, in order
        self.log_path = os.environ.get("GLUE_VLM_TEST_CALL_LOG")

    def predict(self, stamps, task):
        if self.fatal_after is not None and len(self.calls) >= self.fatal_after:
            raise BackendError("test engine: credentials rejected")
        if self.delay:
            time.sleep(self.delay)
        out = []
        for stamp in stamps:
            self.calls.append(stamp.row)
            if stamp.row in self.fail_rows:
                out.append(Prediction.failed(f"row {stamp.row} rejected by the server"))
                continue
            label, probs = expected_answer(stamp.pixels, task.label_names)
            out.append(Prediction(label=label, probabilities=probs, raw_text=label,
                                  method="test", prompt_tokens=10, completion_tokens=1))
        if self.log_path:
            with open(self.log_path, "a") as log:
                log.writelines(f"{stamp.row}\n" for stamp in stamps)
                log.flush()
                os.fsync(log.fileno())
        return out
