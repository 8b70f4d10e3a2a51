"""The record names Apache Traffic Server defines, and the subsystem each belongs to.

Theory of operation: ``ats_records.txt`` (next to this module, generated from an ATS 9.2
``traffic_server`` by ``scripts/ats_record_names.py``) lists every ``proxy.config.*`` /
``proxy.local.*`` name ATS knows, grouped under ``[subsystem]`` lines. The records.config
parser uses it to tell a record ATS has and tsproxy does not implement (grouped into one
warning per subsystem) from a name nobody defines (a typo: a warning of its own, with the
nearest known name). The grouping is this data, not code.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType

ATS_RECORDS_FILE = Path(__file__).with_name("ats_records.txt")
ATS_DOC_ANCHOR = "docs/records.md#ats"


def parse_ats_records(text: str) -> dict[str, str]:
    """name -> subsystem from the text of ats_records.txt."""
    result: dict[str, str] = {}
    subsystem = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("[") and line.endswith("]"):
            subsystem = line[1:-1]
        elif subsystem:
            result[line] = subsystem
    return result


@functools.cache
def ats_records() -> Mapping[str, str]:
    """Every record name ATS defines -> its subsystem (read once per process)."""
    return MappingProxyType(parse_ats_records(ATS_RECORDS_FILE.read_text(encoding="utf-8")))


def closest_name(name: str, known: Iterable[str]) -> str | None:
    """The known record name nearest to a misspelt one, if any is close."""
    matches = difflib.get_close_matches(name, list(known), n=1, cutoff=0.85)
    return matches[0] if matches else None
