"""Tasks: a prompt plus an ordered list of labels, presets, and TOML load/save.

A task's labels are ordered: a label's position is its numeric class code in the
catalog columns, and its option key (``A``, ``B``, ... or ``0``, ``1``, ...) is what a
model is asked to answer with.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Label",
    "Task",
    "TaskError",
    "PRESETS",
    "get_task",
    "load_task",
    "save_task",
]

SLUG_RE = re.compile(r"^[a-z][a-z0-9_-]{0,39}$")
OPTION_STYLES = ("letter", "number")


class TaskError(ValueError):
    """A task definition is invalid; the message says what to change."""


def column_safe(text: str) -> str:
    """Lower-case ``text`` and replace anything that is not a letter or digit by ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


@dataclass(frozen=True)
class Label:
    name: str
    description: str = ""


@dataclass(frozen=True)
class Task:
    """What to ask: ``prompt`` is the question, ``labels`` the answers in code order.

    ``option_style`` says how options are keyed: ``letter`` (A, B, C, ...; the prompt
    gets an option list appended) or ``number`` (0, 1, 2, ...; the prompt already names
    its categories by number, as the published prompts do, and is sent verbatim).
    """

    slug: str
    prompt: str
    labels: tuple[Label, ...]
    option_style: str = "letter"
    title: str = ""
    reference: str = ""

    def __post_init__(self):
        object.__setattr__(self, "labels", tuple(
            lab if isinstance(lab, Label) else Label(*lab) if isinstance(lab, (tuple, list))
            else Label(str(lab)) for lab in self.labels))
        self.validate()

    # -- validation -----------------------------------------------------------------
    def validate(self) -> None:
        if not isinstance(self.slug, str) or not SLUG_RE.match(self.slug):
            raise TaskError(
                f"task name {self.slug!r} is not usable as a column prefix: use 1-40 "
                "lower-case letters, digits, '-' or '_', starting with a letter "
                "(e.g. 'tidal-features')")
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise TaskError(f"task {self.slug!r} has an empty prompt")
        if len(self.labels) < 2:
            raise TaskError(f"task {self.slug!r} needs at least two labels, "
                            f"got {len(self.labels)}")
        if len(self.labels) > 26:
            raise TaskError(f"task {self.slug!r} has {len(self.labels)} labels; "
                            "at most 26 can be offered as options")
        names = [lab.name for lab in self.labels]
        for name in names:
            if not isinstance(name, str) or not name.strip():
                raise TaskError(f"task {self.slug!r} has an empty label name")
            if not column_safe(name):
                raise TaskError(f"label {name!r} of task {self.slug!r} has no letters or "
                                "digits to build a column name from")
        seen: dict[str, str] = {}
        for name in names:
            key = column_safe(name)
            if key in seen:
                what = "twice" if seen[key] == name else f"and {seen[key]!r} (same column name)"
                raise TaskError(f"task {self.slug!r} lists label {name!r} {what}: "
                                "labels must be unique")
            seen[key] = name
        if self.option_style not in OPTION_STYLES:
            raise TaskError(f"option_style must be one of {OPTION_STYLES}, "
                            f"got {self.option_style!r}")

    # -- derived --------------------------------------------------------------------
    @property
    def label_names(self) -> list[str]:
        return [lab.name for lab in self.labels]

    @property
    def option_keys(self) -> list[str]:
        """What the model answers with for each label, in label order."""
        if self.option_style == "number":
            return [str(i) for i in range(len(self.labels))]
        return [chr(ord("A") + i) for i in range(len(self.labels))]

    @property
    def column_prefix(self) -> str:
        return self.slug.replace("-", "_")

    def render_prompt(self) -> str:
        """The text sent to the model alongside the image."""
        if self.option_style == "number":
            return self.prompt.strip()
        lines = [self.prompt.strip(), "", "Options:"]
        for key, lab in zip(self.option_keys, self.labels):
            desc = f": {lab.description}" if lab.description else ""
            lines.append(f"{key}. {lab.name}{desc}")
        lines += ["", "Answer with the letter of one option only."]
        return "\n".join(lines)

    def fingerprint(self) -> str:
        """Hash of everything that changes the model's answer (for the result store)."""
        payload = json.dumps([self.render_prompt(), self.label_names, self.option_keys])
        return hashlib.sha256(payload.encode()).hexdigest()

    # -- TOML -----------------------------------------------------------------------
    def to_dict(self) -> dict:
        data = {"slug": self.slug, "title": self.title, "prompt": self.prompt,
                "option_style": self.option_style}
        if self.reference:
            data["reference"] = self.reference
        data["labels"] = [{"name": lab.name, "description": lab.description}
                          for lab in self.labels]
        return data

    @classmethod
    def from_dict(cls, data: dict, origin: str = "task") -> "Task":
        if not isinstance(data, dict):
            raise TaskError(f"{origin}: expected a table of task fields")
        known = {"slug", "title", "prompt", "option_style", "reference", "labels"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TaskError(f"{origin}: unknown field(s) {', '.join(unknown)}; "
                            f"expected {', '.join(sorted(known))}")
        for required in ("slug", "prompt", "labels"):
            if required not in data:
                raise TaskError(f"{origin}: missing field {required!r}")
        labels = data["labels"]
        if not isinstance(labels, list):
            raise TaskError(f"{origin}: 'labels' must be a list ([[labels]] tables or strings)")
        parsed = []
        for i, lab in enumerate(labels):
            if isinstance(lab, str):
                parsed.append(Label(lab))
            elif isinstance(lab, dict) and isinstance(lab.get("name"), str):
                desc = lab.get("description", "")
                if not isinstance(desc, str):
                    raise TaskError(f"{origin}: description of label {i + 1} must be text")
                parsed.append(Label(lab["name"], desc))
            else:
                raise TaskError(f"{origin}: label {i + 1} needs a text 'name'")
        for key in ("slug", "prompt", "title", "option_style", "reference"):
            if key in data and not isinstance(data[key], str):
                raise TaskError(f"{origin}: {key!r} must be text")
        try:
            return cls(slug=data["slug"], prompt=data["prompt"], labels=tuple(parsed),
                       option_style=data.get("option_style", "letter"),
                       title=data.get("title", ""), reference=data.get("reference", ""))
        except TaskError as exc:
            raise TaskError(f"{origin}: {exc}") from None


def _toml_string(text: str) -> str:
    """A TOML basic string for ``text``: multi-line when it has line breaks, with every
    other control character escaped (TOML forbids them raw)."""
    def escape_controls(value: str) -> str:
        return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", lambda m: f"\\u{ord(m.group()):04x}",
                      value)

    if "\n" in text:
        escaped = text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')
        return f'"""\n{escape_controls(escaped)}"""'
    return escape_controls(json.dumps(text, ensure_ascii=False))


def save_task(task: Task, path: str | Path) -> None:
    """Write ``task`` as TOML that :func:`load_task` reads back unchanged."""
    data = task.to_dict()
    out = []
    for key in ("slug", "title", "option_style", "reference", "prompt"):
        if key in data:
            out.append(f"{key} = {_toml_string(data[key])}")
    for lab in data["labels"]:
        out += ["", "[[labels]]", f"name = {_toml_string(lab['name'])}",
                f"description = {_toml_string(lab['description'])}"]
    Path(path).write_text("\n".join(out) + "\n", encoding="utf-8")


def load_task(path: str | Path) -> Task:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TaskError(f"cannot read task file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise TaskError(f"task file {path} is not UTF-8 text") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise TaskError(f"task file {path} is not valid TOML: {exc}") from None
    return Task.from_dict(data, origin=str(path))


def get_task(name_or_path: str) -> Task:
    """A preset by name, or a task loaded from a ``.toml`` file."""
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    if name_or_path.endswith(".toml") or Path(name_or_path).is_file():
        return load_task(name_or_path)
    raise TaskError(f"unknown task {name_or_path!r}: use one of "
                    f"{', '.join(PRESETS)} or a path to a .toml file")


# -- presets ---------------------------------------------------------------------------
PAPER_REFERENCE = ("Tanoglidis & Jain 2024, RNAAS, 'At First Sight: Zero-Shot "
                   "Classification of Astronomical Images with Large Multimodal Models', "
                   "arXiv:2406.17057")

_PRESET_LIST = [
    Task(
        slug="lsbg-vs-artifact",
        title="Low-surface-brightness galaxy or artifact",
        prompt=("This is a colour cutout from a wide-field optical survey, centred on a "
                "detection. Decide whether the detection at the centre is a genuine "
                "low-surface-brightness galaxy or an artifact."),
        labels=(
            Label("artifact", "not a centred LSB galaxy: diffuse scattered light, "
                  "a bright star or its halo, a reflection, an off-centre bright galaxy"),
            Label("lsbg", "a faint, diffuse, round or elliptical galaxy filling the "
                  "centre; small compact sources may lie nearby"),
        ),
    ),
    Task(
        slug="galaxy-morphology",
        title="Galaxy morphology (GalaxyMNIST classes)",
        prompt=("This is a colour image of a galaxy from the DECaLS survey. Classify "
                "the galaxy at the centre by its visible morphology."),
        labels=(
            Label("smooth_round", "smooth, featureless, round or nearly round"),
            Label("smooth_cigar", "smooth and featureless but elongated, cigar-shaped, "
                  "no disk structure"),
            Label("edge_on_disk", "a thin disk seen edge-on, possibly with a bulge or "
                  "a dust lane"),
            Label("unbarred_spiral", "a disk seen more face-on, with spiral arms "
                  "and no bar"),
        ),
    ),
    Task(
        slug="star-galaxy-artifact",
        title="Star, galaxy or artifact",
        prompt=("This is a cutout from an astronomical image, centred on a detected "
                "source. What is the source at the centre?"),
        labels=(
            Label("star", "point-like, with the image's point-spread function, "
                  "possibly diffraction spikes"),
            Label("galaxy", "extended, resolved light profile"),
            Label("artifact", "a cosmic ray, satellite trail, detector defect, ghost "
                  "or part of a bright star's halo"),
        ),
    ),
    Task(
        slug="tidal-features",
        title="Mergers and tidal features",
        prompt=("This is a deep colour image of a galaxy. Look for signs of a recent "
                "or ongoing interaction around the central galaxy."),
        labels=(
            Label("undisturbed", "no tidal features or interacting companion"),
            Label("tidal_features", "tidal tails, streams, shells or plumes, but no "
                  "second galaxy merging"),
            Label("merger", "two or more galaxies visibly interacting or merging"),
        ),
    ),
    Task(
        slug="paper-lsbg",
        title="LSBG vs artifact, as published (Tanoglidis & Jain 2024)",
        option_style="number",
        reference=PAPER_REFERENCE + "; prompt verbatim from the authors' notebook "
                                    "Zero_shot_LLaVa.ipynb (github.com/dtanoglidis/"
                                    "zero-shot-astro)",
        prompt=(
            "You are tasked to classify astronomical images. Each image belongs to one "
            "of two categories:\n"
            "\n"
            "Low Surface Brightness Galaxies (LSBG, Category 1) or non-LSBG (Category "
            "0).\n"
            "Note that category 0 may also include parts or off-centered LSBGs.\n"
            "\n"
            "Here are some characteristics of the two categories:\n"
            "\n"
            "Category 1, LSBG: The image is dominated by a well-centered,\n"
            "circular or elliptical, diffuse galaxy-like light source. There may be "
            "some\n"
            "smaller, more compact light sources nearby.\n"
            "\n"
            "Category 0: In this category belong all the images that do not fit into "
            "the\n"
            "category 1 definiton. Examples may include: off-centered bright galaxies, "
            "diffuse light,\n"
            "bright stars, light reflections.\n"
            "\n"
            "To what category does the image belong?"),
        labels=(Label("artifact", "Category 0: non-LSBG"),
                Label("lsbg", "Category 1: low-surface-brightness galaxy")),
    ),
    Task(
        slug="paper-morphology",
        title="GalaxyMNIST morphology, as published (Tanoglidis & Jain 2024)",
        option_style="number",
        reference=PAPER_REFERENCE + "; prompt verbatim from the authors' notebook "
                                    "Zero_shot_LLaVa.ipynb (github.com/dtanoglidis/"
                                    "zero-shot-astro)",
        prompt=(
            "You are tasked to classify images depicting galaxies, into four "
            "morphological categories:\n"
            "\n"
            "Category 0: smooth and round galaxy. Should not have signs of spires.\n"
            "\n"
            "Category 1: smooth and cigar-shaped galaxy, looks like being seen edge "
            "on. This should not have signs of spires of a spiral galaxy\n"
            "\n"
            "Category 2: edge-on-disk/spiral galaxy. This disk galaxy should have "
            "signs of spires, as seen from an edge-on perspective\n"
            "\n"
            "Category 3:  unbarred spiral galaxy. Has signs of a disk and/or spires\n"
            "\n"
            "Note that categories 1 and 2 tend to be very similar to each other.\n"
            "To categorize them, ask yourself the following question: Is this galaxy "
            "very smooth, maybe with a small bulge? Then it\n"
            "belongs to category 1. Does it have irregularities/signs of structure? "
            "Then it belongs to category 2.\n"
            "\n"
            "To which category does the image belong?"),
        labels=(Label("smooth_round", "Category 0"), Label("smooth_cigar", "Category 1"),
                Label("edge_on_disk", "Category 2"),
                Label("unbarred_spiral", "Category 3")),
    ),
]

PRESETS: dict[str, Task] = {task.slug: task for task in _PRESET_LIST}
