"""records.config: parsing and the immutable RecordsConfig snapshot.

Theory of operation: ``parse_records_text`` turns the text of a records.config into typed
values checked against ``spec.RECORDS``; anything wrong with a known record is a ConfigError
carrying ``FILE:LINE``. Unknown record names and duplicates are only warnings (ATS ignores
the former and lets the last of the latter win), so a file written for a newer or older
tsproxy still starts. ``RecordsConfig`` is the result laid over the table's defaults: one
complete, read-only snapshot that the rest of the proxy is handed explicitly (there is no
global "current config"). A reload builds a new snapshot and compares it with ``diff`` and
``restart_required``.

Syntax (ATS): ``CONFIG name TYPE value`` (``LOCAL`` is read as ``CONFIG``). TYPE is INT,
FLOAT, STRING or COUNTER (read as INT). INT takes an optional sign and a K/M/G/T suffix
(powers of 1024). STRING runs to the end of the line, trailing whitespace trimmed; ``NULL``
means the empty string. Lines starting with ``#`` and blank lines are skipped.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from iocore.records.ats import ATS_DOC_ANCHOR, ats_records, closest_name
from iocore.records.errors import ConfigError
from iocore.records.spec import RECORDS, RECORDS_BY_NAME, RecType, RecUpdate, RecValue

RECORDS_CONFIG = "records.config"

_LINE = re.compile(r"(?P<scope>\S+)\s+(?P<name>\S+)\s+(?P<type>\S+)(?:\s+(?P<value>.*))?$")
_INT = re.compile(r"(?P<num>[-+]?\d+)(?P<suffix>[KMGT]?)$", re.IGNORECASE)
_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_TYPES = {"INT": RecType.INT, "COUNTER": RecType.INT, "FLOAT": RecType.FLOAT, "STRING": RecType.STRING}

_PYTHON_TYPES: dict[RecType, type | tuple[type, ...]] = {
    RecType.INT: int,
    RecType.FLOAT: (int, float),
    RecType.STRING: str,
}


@dataclass(frozen=True, slots=True)
class ParsedRecords:
    """What one records.config said: values of known records, their lines, and warnings."""

    values: Mapping[str, RecValue]
    lines: Mapping[str, int]
    warnings: tuple[str, ...]


def parse_value(rtype: RecType, text: str) -> RecValue:
    """Convert the text of a value to ``rtype``; ValueError says what was wrong."""
    if rtype is RecType.STRING:
        return "" if text == "NULL" else text
    if rtype is RecType.INT:
        m = _INT.fullmatch(text)
        if m is None:
            raise ValueError(f"expected an integer (optionally with K/M/G/T), got {text!r}")
        return int(m["num"]) * _SUFFIX[m["suffix"].upper()]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {text!r}")
    return value


def check_value(name: str, value: RecValue) -> str | None:
    """Run the table's validator for ``name``; returns ``NAME: message`` or None."""
    spec = RECORDS_BY_NAME[name]
    if spec.check is None:
        return None
    problem = spec.check(value)
    return None if problem is None else f"{name}: {problem}"


def parse_records_text(text: str, path: str) -> ParsedRecords:
    """Parse records.config text; ``path`` is only used in messages."""
    values: dict[str, RecValue] = {}
    lines: dict[str, int] = {}
    warnings: list[str] = []
    ats = ats_records()
    not_implemented: dict[str, list[int]] = {}  # ATS subsystem -> lines of its records
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None or m["scope"] not in ("CONFIG", "LOCAL"):
            raise ConfigError(path, lineno, f"expected 'CONFIG name TYPE value', got {line!r}")
        name, type_word, value_text = m["name"], m["type"], (m["value"] or "").rstrip()
        rtype = _TYPES.get(type_word)
        if rtype is None:
            raise ConfigError(path, lineno, f"{name}: unknown type {type_word!r} (INT, FLOAT or STRING)")
        if rtype is not RecType.STRING and not value_text:
            raise ConfigError(path, lineno, f"{name}: missing value")
        spec = RECORDS_BY_NAME.get(name)
        if spec is None:
            subsystem = ats.get(name)
            if subsystem is not None:
                not_implemented.setdefault(subsystem, []).append(lineno)
            else:
                near = closest_name(name, [*RECORDS_BY_NAME, *ats])
                hint = f"; did you mean {near}?" if near else ""
                why = f"ignored; ATS has no such record either{hint}"
                warnings.append(f"{path}:{lineno}: unknown record {name} ({why})")
            continue
        if rtype is not spec.type:
            message = f"{name}: declared {type_word}, but the record is {spec.type.value}"
            raise ConfigError(path, lineno, message)
        try:
            value = parse_value(rtype, value_text)
        except ValueError as exc:
            raise ConfigError(path, lineno, f"{name}: {exc}") from exc
        problem = check_value(name, value)
        if problem is not None:
            raise ConfigError(path, lineno, problem)
        if name in lines:
            warnings.append(
                f"{path}:{lineno}: {name} is also set at line {lines[name]}; the later value wins"
            )
        values[name] = value
        lines[name] = lineno
    for subsystem, at in sorted(not_implemented.items()):
        records = "record" if len(at) == 1 else "records"
        warnings.append(
            f"{path}: ATS {subsystem}: ignored, not implemented: {len(at)} {records} "
            f"(line{'s' if len(at) > 1 else ''} {_line_list(at)}), see {ATS_DOC_ANCHOR}"
        )
    return ParsedRecords(MappingProxyType(values), MappingProxyType(lines), tuple(warnings))


def _line_list(numbers: list[int], most: int = 8) -> str:
    shown = ", ".join(str(n) for n in numbers[:most])
    return shown + (f" and {len(numbers) - most} more" if len(numbers) > most else "")


class RecordsConfig:
    """One complete, immutable set of record values: the table defaults plus the file.

    Paths: ``path`` and ``config_dir`` are absolute, so a later chdir does not change what
    relative records mean. Messages built from ``line_of`` should use ``path``.
    """

    __slots__ = ("_lines", "_values", "config_dir", "path", "warnings")

    def __init__(self, path: Path, parsed: ParsedRecords | None = None) -> None:
        """Lay ``parsed`` (already checked) over the defaults; None gives all defaults."""
        parsed = parsed if parsed is not None else ParsedRecords({}, {}, ())
        self.path: Path = path.absolute()
        self.config_dir: Path = self.path.parent
        self.warnings: tuple[str, ...] = parsed.warnings
        self._values: Mapping[str, RecValue] = MappingProxyType(
            {spec.name: parsed.values.get(spec.name, spec.default) for spec in RECORDS}
        )
        self._lines: Mapping[str, int] = parsed.lines

    @classmethod
    def from_text(cls, text: str, path: Path) -> RecordsConfig:
        """Parse ``text`` as if it were the file ``path`` (which need not exist)."""
        return cls(path, parse_records_text(text, str(path)))

    @classmethod
    def from_values(cls, config_dir: Path, values: Mapping[str, RecValue]) -> RecordsConfig:
        """Build a snapshot from Python values (tests, tools); checked like the file would be."""
        path = config_dir / RECORDS_CONFIG
        checked: dict[str, RecValue] = {}
        for name, value in values.items():
            spec = RECORDS_BY_NAME.get(name)
            if spec is None:
                raise ConfigError(str(path), None, f"unknown record {name}")
            if isinstance(value, bool) or not isinstance(value, _PYTHON_TYPES[spec.type]):
                raise ConfigError(str(path), None, f"{name}: expected {spec.type.value}, got {value!r}")
            problem = check_value(name, value)
            if problem is not None:
                raise ConfigError(str(path), None, problem)
            checked[name] = float(value) if spec.type is RecType.FLOAT else value
        return cls(path, ParsedRecords(checked, {}, ()))

    def get(self, name: str) -> RecValue:
        """The value of ``name``; KeyError for a name not in the table."""
        return self._values[name]

    def __getitem__(self, name: str) -> RecValue:
        return self._values[name]

    def get_int(self, name: str) -> int:
        """The value of an INT record, typed for callers."""
        value = self._values[name]
        if not isinstance(value, int):
            raise TypeError(f"{name} is not an INT record")
        return value

    def get_float(self, name: str) -> float:
        """The value of a FLOAT record, typed for callers."""
        value = self._values[name]
        if not isinstance(value, float):
            raise TypeError(f"{name} is not a FLOAT record")
        return value

    def get_str(self, name: str) -> str:
        """The value of a STRING record, typed for callers."""
        value = self._values[name]
        if not isinstance(value, str):
            raise TypeError(f"{name} is not a STRING record")
        return value

    def items(self) -> Iterator[tuple[str, RecValue]]:
        """Every record and its value, in table order."""
        return iter(self._values.items())

    def line_of(self, name: str) -> int | None:
        """The line of records.config that set ``name``; None if it has its default."""
        return self._lines.get(name)

    def resolve_path(self, name: str) -> Path | None:
        """A STRING record read as a path relative to the config directory.

        An empty value means "not configured" and gives None rather than the config
        directory itself, so callers cannot mistake an unset file for a directory.
        """
        value = self.get_str(name)
        if not value:
            return None
        return self.config_dir / Path(value).expanduser()

    def diff(self, other: RecordsConfig) -> list[str]:
        """Names whose values differ between the two snapshots, in table order."""
        return [name for name, value in self._values.items() if other._values[name] != value]

    def restart_required(self, other: RecordsConfig) -> list[str]:
        """The changed names that only take effect after a restart."""
        return [name for name in self.diff(other) if RECORDS_BY_NAME[name].update is RecUpdate.RESTART]


def load_records(config_dir: Path) -> RecordsConfig:
    """Read ``config_dir/records.config``; a missing or unreadable file is a ConfigError."""
    path = config_dir / RECORDS_CONFIG
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), None, f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(str(path), None, f"not UTF-8 text: {exc.reason}") from exc
    return RecordsConfig(path, parse_records_text(text, str(path)))
