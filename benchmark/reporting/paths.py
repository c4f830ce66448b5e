"""File names of a report: safe slugs for scenarios, protocols and methods, never two alike."""

from __future__ import annotations

import re
from typing import Any, Mapping

from benchmark.record import PROTOCOL_KEYS


def slug(name: str) -> str:
    """A file-name-safe version of ``name``: letters, digits, '.', '-' and '_' only."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", str(name)).strip("-.")
    return text or "unnamed"


def protocol_slug(protocol: Mapping[str, Any]) -> str:
    keys = [k for k in PROTOCOL_KEYS if k in protocol] + sorted(k for k in protocol if k not in PROTOCOL_KEYS)
    return "-".join(str(protocol[k]) for k in keys) or "default"


def table_folder_names(scenario: str, protocol: Mapping[str, Any], several_protocols: bool) -> list[str]:
    """``[scenario]``, or ``[scenario, protocol]`` when the scenario was run under several protocols."""
    names = [slug(scenario)]
    if several_protocols:
        names.append(slug(protocol_slug(protocol)))
    return names


def unique(name: str, used: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... if two raw names sanitise to the same file name."""
    candidate, counter = name, 1
    while candidate in used:
        counter += 1
        candidate = f"{name}-{counter}"
    used.add(candidate)
    return candidate
