"""Token logprobs of a constrained answer -> one probability per label.

The answer is the label written out, either as the value of a JSON string
(``{"label":"smooth_round"}``, strict ``json_schema``) or bare (``smooth_round``, a
``choice`` constraint). The server returns, for every generated token, the top
alternatives at that position with their logprobs. Where the label value starts, those
alternatives are the model's distribution over how the label begins.

We walk the generated tokens from the start of the value. At each position we know the
set ``S`` of labels still consistent with the value written so far. Each alternative
token extends that prefix; the labels it is consistent with form its group. Then:

- alternatives consistent with every label in ``S`` carry no information and are
  dropped (the rest is renormalised: in effect they are spread like the others);
- alternatives consistent with no label are dropped too (a strict enum cannot produce
  them; a server that reports pre-constraint logprobs does);
- a group of one label gives that label its mass;
- the group of the token actually generated is resolved further down the answer: its
  mass is multiplied into the distribution found at the next positions;
- any other group of several labels (an alternative branch we never see the rest of)
  shares its mass equally -- the one approximation; it only arises when labels share
  a leading token and the model did not take that branch.

The result sums to one over the labels. With labels that differ in their first token
(the usual case) it is exactly the softmax of the first value token's alternatives,
restricted to the labels; the chosen label's probability is exact whenever no label
begins another. Where one does (``spiral`` and ``spiral_barred``), an alternative token
that ends inside both is ambiguous and is treated as carrying no information.
"""

from __future__ import annotations

import json
import math
import re
from typing import Sequence

__all__ = ["label_probabilities"]

_JSON_VALUE_START = re.compile(r'"label"\s*:\s*"')


def _encoded(label: str) -> str:
    """How a label is written inside a JSON string."""
    return json.dumps(label, ensure_ascii=False)[1:-1]


def label_probabilities(content: str, tokens: Sequence[dict], labels: Sequence[str],
                        json_value: bool = True) -> dict[str, float] | None:
    """Probabilities per label from ``tokens`` (the ``logprobs.content`` list of a chat
    completion: dicts with ``token``, ``logprob``, ``top_logprobs``), or None when the
    tokens do not spell ``content`` or the value cannot be located.

    ``json_value``: the label is the value of ``"label"`` in a JSON object (else the
    whole ``content`` is the label)."""
    texts = [str(t.get("token", "")) for t in tokens]
    if "".join(texts) != content:
        return None
    if json_value:
        match = _JSON_VALUE_START.search(content)
        if match is None:
            return None
        value_start, terminator = match.end(), '"'
        written = {lab: _encoded(lab) for lab in labels}
    else:
        value_start, terminator = len(content) - len(content.lstrip()), None
        written = {lab: lab for lab in labels}

    def consistent(value: str, alive: set[str]) -> set[str]:
        """Labels in ``alive`` whose written form agrees with ``value`` so far."""
        if terminator is not None and terminator in value:
            value = value[:value.index(terminator)]
            return {lab for lab in alive if written[lab] == value}
        return {lab for lab in alive if written[lab].startswith(value)}

    result = {lab: 0.0 for lab in labels}
    alive, mass = set(labels), 1.0
    offset = 0
    for text, item in zip(texts, tokens):
        start, offset = offset, offset + len(text)
        if offset <= value_start:
            continue
        if len(alive) <= 1:
            break
        lead = content[start:value_start] if start < value_start else ""
        before = content[value_start:start] if start > value_start else ""
        chosen = consistent(before + text[len(lead):], alive)
        groups: dict[frozenset, float] = {}
        alternatives = list(item.get("top_logprobs") or [])
        if not any(a.get("token") == text for a in alternatives):
            alternatives.append({"token": text, "logprob": item.get("logprob", 0.0)})
        for alt in alternatives:
            alt_text = str(alt.get("token", ""))
            if not alt_text.startswith(lead):
                continue
            group = frozenset(consistent(before + alt_text[len(lead):], alive))
            if not group or (group == alive and group != chosen):
                continue
            groups[group] = groups.get(group, 0.0) + math.exp(float(alt.get("logprob", 0.0)))
        total = sum(groups.values())
        chosen_key = frozenset(chosen)
        if total <= 0 or chosen_key not in groups:
            break
        for group, p in groups.items():
            if group == chosen_key:
                continue
            for lab in group:
                result[lab] += mass * p / total / len(group)
        mass *= groups[chosen_key] / total
        alive = set(chosen)
    for lab in alive:
        result[lab] += mass / len(alive)
    return result
