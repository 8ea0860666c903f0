"""The small protocol every engine implements, and what it returns.

An engine (``Backend``) turns a batch of prepared stamps plus a task into one
``Prediction`` per stamp. It never raises for one bad row: that row's prediction carries
an ``error``. It raises ``BackendError`` only when it cannot work at all (bad
credentials, model missing), which stops the run with that message.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from ..stamps import Stamp
    from ..tasks import Task

__all__ = ["Backend", "BackendError", "CostEstimate", "Prediction", "create_backend",
           "BACKENDS"]


class BackendError(RuntimeError):
    """The engine cannot work at all; the message tells the user what to fix."""


@dataclass
class Prediction:
    """One answer. ``probabilities`` maps every label of the task to a probability when
    the engine can give them, else is None. ``label`` is None when the row failed or the
    answer could not be read (then ``error`` says why)."""

    label: str | None
    probabilities: dict[str, float] | None = None
    raw_text: str = ""
    error: str | None = None
    method: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def confidence(self) -> float | None:
        if self.label is None or not self.probabilities:
            return None
        return self.probabilities.get(self.label)

    @property
    def ok(self) -> bool:
        return self.error is None and self.label is not None

    @classmethod
    def failed(cls, reason: str, raw_text: str = "", method: str = "") -> "Prediction":
        return cls(label=None, error=reason, raw_text=raw_text, method=method)


@dataclass
class CostEstimate:
    n_images: int
    input_tokens: int
    output_tokens: int
    dollars: float | None = None  # None: free or unknown (local engines)
    note: str = ""

    def describe(self) -> str:
        text = (f"{self.n_images} images, ~{self.input_tokens:,} input + "
                f"{self.output_tokens:,} output tokens")
        if self.dollars is not None:
            text += f", ~${self.dollars:,.2f}"
        if self.note:
            text += f" ({self.note})"
        return text


class Backend(ABC):
    """An engine. Subclasses set the class attributes and implement ``predict``."""

    #: short name used on the command line and in the store key
    name: ClassVar[str] = ""
    #: what ``predict`` reads from a stamp: ``"png"`` bytes (HTTP engines) or the
    #: ``"array"`` of uint8 pixels (in-process models)
    accepts: ClassVar[str] = "png"
    #: largest stamp side the engine benefits from; larger stamps are shrunk
    max_stamp_size: int | None = None
    #: how many stamps ``predict`` should be given at once
    batch_size: int = 16
    #: whether predictions carry real class probabilities
    gives_probabilities: bool = False
    model: str = ""

    @abstractmethod
    def predict(self, stamps: Sequence["Stamp"], task: "Task") -> list[Prediction]:
        """One prediction per stamp, in order. Per-row problems go in ``error``."""

    def settings(self) -> dict:
        """Everything besides the task and pixels that changes the answer, as JSON-able
        values (never a secret): part of the result-store key."""
        return {"backend": self.name, "model": self.model}

    def estimate_cost(self, n_images: int, task: "Task") -> CostEstimate:
        return CostEstimate(n_images, 0, 0, None, "no estimate for this engine")

    def attach_store(self, store) -> None:
        """Called by the run with its ``ResultStore``; engines that keep state across
        runs (open Batch API jobs) keep it there. Most engines need nothing."""

    def close(self) -> None:
        """Release connections, memory, GPUs."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


#: engines by short name; any other ``package.module:Class`` also works
BACKENDS = {
    "openai": "glue_vlm.backends.openai:OpenAIBackend",
    "local": "glue_vlm.backends.local:LocalBackend",
}


def backend_class(spec: str) -> type[Backend]:
    target = BACKENDS.get(spec, spec)
    if ":" not in target:
        raise BackendError(f"unknown backend {spec!r}: use one of {', '.join(BACKENDS)} "
                           "or 'package.module:Class'")
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (" (install the extra: pip install 'glue-vlm[local]')"
                if spec == "local" else "")
        raise BackendError(f"backend {spec!r} cannot be loaded: {exc}{hint}") from None
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Backend)):
        raise BackendError(f"{target} is not a glue_vlm Backend class")
    return cls


def create_backend(spec: str, **options) -> Backend:
    """Build an engine from its short name (or import path) and its options; options
    that are None are left to the engine's defaults."""
    cls = backend_class(spec)
    options = {k: v for k, v in options.items() if v is not None}
    try:
        return cls(**options)
    except TypeError as exc:
        raise BackendError(f"backend {spec!r} does not take these options: {exc}") from None


@dataclass
class Usage:
    """Token usage summed over a run."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    calls: int = 0
    by_method: dict[str, int] = field(default_factory=dict)

    def add(self, prediction: Prediction) -> None:
        self.prompt_tokens += prediction.prompt_tokens
        self.completion_tokens += prediction.completion_tokens
        if prediction.method:
            self.by_method[prediction.method] = self.by_method.get(prediction.method, 0) + 1
