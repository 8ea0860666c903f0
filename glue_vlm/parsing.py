"""Free text from a model -> one of the task's labels, or None ("unparsed").

The fallback for engines that answer in words (servers that ignore structured output,
chatty models). It reads what the answer *says* and never guesses: an answer that names
two different labels, or none, is unparsed.

What counts as naming a label (``parse_answer`` tries them in this order):

1. JSON anywhere in the text with an answer field (``label``, ``answer``, ``class``,
   ``category``, ...): its value decides alone; an integer (or a string of digits) is a
   0-based label index.
2. The whole answer is a label's name or an option key in any case: ``Edge-on disk``,
   ``b``, ``(B)``, ``1.``.
3. Mentions in the text, found on words lower-cased with ``_``/``-``/spaces alike:
   a label's name (``edge-on disk``, ``Edge_On_Disk``, plural ``artifacts``), a synonym
   from a small per-label table (``LSB galaxy`` -> ``lsbg``, ``cigar-shaped`` ->
   ``smooth_cigar``; a synonym is dropped for a task where it is part of another
   label's name), ``Category N`` / ``class: N`` (N indexes the labels from 0, as the
   published prompts number them), option letters where they read as an answer
   (``B.``, ``(B)``, ``Answer: B``, ``option B``, ``it is B.``; a lone ``A``/``I``
   followed by a word is English, not an option), digits for number-style tasks in the
   same places. The longest phrase wins where phrases overlap (``edge-on spiral`` is
   ``edge_on_disk``, not ``unbarred_spiral``).
   A mention preceded within three words (same clause) by a negation (``not``, ``no``,
   ``non-``, ``isn't``, ``rather than``, ``instead of``, ...) does not count.
   Mentions after an answer cue (``answer``, ``belongs to``, ``classified as``, ...) in
   the same sentence decide when they name exactly one label; otherwise all mentions
   must agree on one label.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .tasks import Task

__all__ = ["parse_answer"]

#: JSON fields that hold the answer, in order of preference
ANSWER_FIELDS = ("label", "answer", "class", "category", "classification",
                 "prediction", "choice", "option", "result")

#: hand-picked synonyms, keyed by label name as written in the presets (plurals and
#: longer phrases that start with a synonym need no entry of their own)
SYNONYMS: dict[str, tuple[str, ...]] = {
    "lsbg": ("lsb", "low surface brightness", "ultra diffuse galaxy", "udg"),
    "artifact": ("artefact", "non lsbg", "non lsb", "spurious detection", "cosmic ray",
                 "satellite trail"),
    "smooth_round": ("round",),
    "smooth_cigar": ("cigar",),
    # "edge-on spiral" must outrank "spiral"; "edge-on-disk/spiral" quotes the paper
    "edge_on_disk": ("edge on", "edgeon", "edge on spiral", "edge on disk spiral"),
    "unbarred_spiral": ("spiral",),
    "star": ("point source", "point like"),
    "galaxy": ("extended source",),
    "undisturbed": ("no tidal feature", "no signs of interaction", "no interaction",
                    "not interacting", "no merger", "isolated"),
    "tidal_features": ("tidal", "stellar stream", "shell"),
    "merger": ("merging", "interacting", "interaction"),
}

#: objects tried per answer: bounds the work on text full of braces
JSON_ATTEMPTS = 20
NEGATIONS = frozenset({"not", "no", "non", "never", "neither", "nor", "without", "isn",
                       "aren", "wasn", "doesn", "don", "cannot", "than", "instead",
                       "unlike"})
NEGATION_WINDOW = 3
#: words after which a lone option letter or digit reads as the answer
KEY_CUES = frozenset({"answer", "option", "choice", "letter", "category", "class",
                      "classification", "label", "prediction", "is", "s", "be", "was",
                      "as", "with", "choose", "pick", "select", "think", "guess", "say",
                      "either", "or", "and", "nor", "between", "vs", "versus"})
#: words that may follow a digit or a lone ``A`` when it is an option, not an article
KEY_FOLLOWERS = frozenset({"or", "and", "nor", "but", "because", "since", "vs", "versus",
                           "is", "seems", "fits"})
#: words after which "N" is a 0-based label index for any task
INDEX_CUES = frozenset({"category", "class", "cat", "type"})
#: words that introduce the model's verdict; the rest of that sentence is "stated"
STATEMENT_CUES = frozenset({"answer", "belongs", "belong", "classified", "classify",
                            "classification", "verdict", "conclusion", "final"})
NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
                "six": 6, "seven": 7, "eight": 8, "nine": 9}
CLAUSE_BREAKS = frozenset(".,;:!?()[]{}\n")
SENTENCE_BREAKS = frozenset(".;!?\n")
TOKEN_RE = re.compile(r"[A-Za-z0-9]+|\n|[^\sA-Za-z0-9]")
WORD_RE = re.compile(r"[a-z0-9]+")
DIGITS_RE = re.compile(r"[0-9]{1,3}")


def parse_answer(text: str, task: "Task") -> str | None:
    """The label ``text`` names, one of ``task.label_names``, or None when it names
    none or more than one (see the module docstring for what counts)."""
    if not isinstance(text, str) or not text.strip():
        return None
    found, label = _from_json(text, task)
    if found:
        return label
    return _whole_answer(text, task) or _from_mentions(text, task)


# -- JSON -------------------------------------------------------------------------------
_MISSING = object()


def _from_json(text: str, task: "Task") -> tuple[bool, str | None]:
    """(True, label or None) when a JSON object in ``text`` has an answer field."""
    decoder = json.JSONDecoder()
    start = text.find("{")
    for _ in range(JSON_ATTEMPTS):
        if start == -1:
            break
        try:
            obj = decoder.raw_decode(text, start)[0]
        except (ValueError, RecursionError):
            obj = None
        value = _answer_field(obj)
        if value is not _MISSING:
            return True, _from_value(value, task)
        start = text.find("{", start + 1)
    return False, None


def _answer_field(obj):
    """The value of the first answer field of a JSON object (looking inside nested
    objects: ``{"result": {"label": ...}}``), or ``_MISSING``."""
    value = _MISSING
    while isinstance(obj, dict):
        fields = {str(k).lower(): v for k, v in obj.items()}
        name = next((name for name in ANSWER_FIELDS if name in fields), None)
        if name is None:
            break
        value = obj = fields[name]
    return value


def _from_value(value, task: "Task") -> str | None:
    if isinstance(value, str) and DIGITS_RE.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return task.label_names[value] if 0 <= value < len(task.labels) else None
    if isinstance(value, str):
        return _whole_answer(value, task) or _from_mentions(value, task)
    return None


# -- the whole answer is a name or a key ----------------------------------------------------
def _whole_answer(text: str, task: "Task") -> str | None:
    """The label whose name or option key is the whole answer (``Edge-on disk``, ``b``,
    ``(B)``, ``1.``)."""
    words = WORD_RE.findall(text.lower())
    for name in task.label_names:
        if words == WORD_RE.findall(name.lower()):
            return name
    bare = text.strip().strip("*`'\"").strip()
    bare = re.sub(r"^[(\[]\s*(\w+)\s*[)\]]$", r"\1", bare).rstrip(".:)").strip()
    for key, name in zip(task.option_keys, task.label_names):
        if bare.upper() == key:
            return name
    return None


# -- mentions in free text ------------------------------------------------------------------
@dataclass
class _Mention:
    label: str
    start: int  # token where the mention begins, cue included (negation looks before)
    at: int  # token of the key or the phrase's first word (answer statements hold it)


def _from_mentions(text: str, task: "Task") -> str | None:
    tokens = TOKEN_RE.findall(text.replace("*", " ").replace("`", " "))
    mentions = _key_mentions(tokens, task) + _phrase_mentions(tokens, task)
    mentions = [m for m in mentions if not _negated(tokens, m.start)]
    stated = _stated_positions(tokens)
    for group in ([m for m in mentions if m.at in stated], mentions):
        labels = {m.label for m in group}
        if len(labels) == 1:
            return labels.pop()
        if len(labels) > 1:
            return None
    return None


def _is_word(token: str | None) -> bool:
    return token is not None and token[0].isascii() and token[0].isalnum()


def _small_int(token: str) -> int | None:
    return int(token) if DIGITS_RE.fullmatch(token) else None


def _previous_words(tokens: list[str], i: int, limit: int, skip: str = ""):
    """Up to ``limit`` (index, lower-cased word) before token ``i``, nearest first,
    stopping at a clause break (characters in ``skip`` are stepped over)."""
    j, seen = i - 1, 0
    while j >= 0 and seen < limit:
        tok = tokens[j]
        if _is_word(tok):
            yield j, tok.lower()
            seen += 1
        elif tok in CLAUSE_BREAKS and tok not in skip:
            return
        j -= 1


def _key_mentions(tokens: list[str], task: "Task") -> list[_Mention]:
    """Option letters / digits / ``Category N`` that read as an answer."""
    letters = task.option_style == "letter"
    out = []
    for i, tok in enumerate(tokens):
        # "Category 2", "class: two" -> label index, whatever the option style
        index = _small_int(tok)
        if index is None:
            index = NUMBER_WORDS.get(tok.lower())
        if index is not None and index < len(task.labels):
            for j, word in _previous_words(tokens, i, 1, skip=":#("):
                if word in INDEX_CUES:
                    out.append(_Mention(task.label_names[index], j, i))
        # "B." at the start of a line, "(B)", "Answer: B", "it is B.", "A or B"
        if letters and len(tok) == 1 and "A" <= tok <= "Z":
            index = ord(tok) - ord("A")
        elif not letters and _small_int(tok) is not None:
            index = _small_int(tok)
        else:
            continue
        if index >= len(task.labels):
            continue
        start = _key_start(tokens, i, strict=not letters or tok in ("A", "I"))
        if start is not None:
            out.append(_Mention(task.label_names[index], start, i))
    return out


def _key_start(tokens: list[str], i: int, strict: bool) -> int | None:
    """Where the option key at token ``i`` begins if it reads as an answer, else None.
    ``strict`` keys (digits, ``A``, ``I``) must not run into an ordinary word."""
    prev = tokens[i - 1] if i > 0 else None
    nxt = tokens[i + 1] if i + 1 < len(tokens) else None
    if prev in ("(", "[") and nxt in (")", "]"):
        return i - 1
    ends = nxt is None or (not _is_word(nxt) and nxt not in ("'", "’", "/", "-", "_"))
    line_start = prev is None or prev == "\n"
    if ends and line_start:
        return i
    if strict and not (ends or nxt.lower() in KEY_FOLLOWERS):
        return None
    cued = any(word in KEY_CUES for _, word in _previous_words(tokens, i, 2, skip=":("))
    return i if cued else None


def _phrases(task: "Task") -> list[tuple[tuple[str, ...], str]]:
    """(words, label) for every name and usable synonym, longest first."""
    names = {lab: tuple(WORD_RE.findall(lab.lower())) for lab in task.label_names}
    phrases = [(words, lab) for lab, words in names.items()]
    for lab in task.label_names:
        for synonym in SYNONYMS.get(lab, ()):
            words = tuple(WORD_RE.findall(synonym))
            clash = any(_contains(other, words) for o, other in names.items() if o != lab)
            if not clash:
                phrases.append((words, lab))
    phrases += [(("".join(words),), lab) for words, lab in list(phrases) if len(words) > 1]
    return sorted(set(phrases), key=lambda p: (-sum(map(len, p[0])), -len(p[0]), p))


def _contains(words: tuple[str, ...], part: tuple[str, ...]) -> bool:
    n = len(part)
    return any(words[i:i + n] == part for i in range(len(words) - n + 1))


def _word_matches(word: str, base: str) -> bool:
    """``word`` is ``base`` or its plural (``artifacts``, ``galaxies``, ``features``)."""
    if word == base or word in (base + "s", base + "es"):
        return True
    return base.endswith("y") and word == base[:-1] + "ies"


def _phrase_mentions(tokens: list[str], task: "Task") -> list[_Mention]:
    """Label names and synonyms; a longer phrase claims its words first."""
    index = [i for i, tok in enumerate(tokens)
             if _is_word(tok) or tok in CLAUSE_BREAKS]
    words = [tokens[i].lower() if _is_word(tokens[i]) else None for i in index]
    claimed = [False] * len(words)
    out = []
    for phrase, label in _phrases(task):
        n = len(phrase)
        for s in range(len(words) - n + 1):
            if any(claimed[s:s + n]):
                continue
            if words[s:s + n - 1] == list(phrase[:-1]) and words[s + n - 1] is not None \
                    and _word_matches(words[s + n - 1], phrase[-1]):
                claimed[s:s + n] = [True] * n
                out.append(_Mention(label, index[s], index[s]))
    return out


def _negated(tokens: list[str], start: int) -> bool:
    return any(word in NEGATIONS for _, word in _previous_words(tokens, start, NEGATION_WINDOW))


def _stated_positions(tokens: list[str]) -> set[int]:
    """Token indices in the rest of a sentence after an answer cue."""
    stated, inside = set(), False
    for i, tok in enumerate(tokens):
        if tok in SENTENCE_BREAKS and not (tok == "." and _between_digits(tokens, i)):
            inside = False
        elif inside:
            stated.add(i)
        if _is_word(tok) and tok.lower() in STATEMENT_CUES:
            inside = True
    return stated


def _between_digits(tokens: list[str], i: int) -> bool:
    return 0 < i < len(tokens) - 1 and tokens[i - 1].isdigit() and tokens[i + 1].isdigit()
