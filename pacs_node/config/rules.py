"""Routing rules: which series go to which pipeline, evaluated without ``eval``.

A *matcher* (the ``match`` mapping of a route or of a pipeline input) maps DICOM
keywords, or the combinators ``all``, ``any`` and ``not``, to conditions. Several
keys in one mapping must all hold::

    match:
      Modality: MR                         # case-insensitive regex, full match
      SeriesDescription: [".*dwi.*", ".*trace.*"]   # a list: any of them
      ImageType: ADC                       # multi-valued: any value full-matches
      SliceThickness: "<= 5"               # numeric comparison (<=, >=, <, >, ==, !=)
      EchoNumbers: 1                       # a number: numeric equality
      ContrastBolusAgent: false            # true: present, false: absent
      not: {SeriesDescription: ".*adc.*"}
      any: [{BodyPartExamined: ABDOMEN}, {BodyPartExamined: KIDNEY}]

A missing attribute fails every condition except ``false``. A route takes a
series when its own ``match`` holds (an empty one always does) and the series
fills at least one input role of the route's pipeline. Keywords are checked
against pydicom's dictionary and regexes are compiled when the configuration
loads (:func:`compile_settings`), so a typo is reported with its location, not at
the first series. Every evaluation says *why* it failed, in words a PACS
administrator can act on; ``pacs-node rules test`` (:func:`rules_report`) prints
those reasons for the series in a folder.

Before any rule, :func:`loop_guard` keeps localizers, secondary captures,
non-image objects and everything pacs-node produced itself out of the pipelines.

Regular expressions are bounded so that no header can make one run for long
(Python's ``re`` backtracks, holds the GIL while it does, and cannot be
interrupted): a pattern is at most :data:`MAX_PATTERN_LENGTH` characters, and
its worst case on a value of the attribute's longest length
(:func:`match_length`) is estimated when it compiles (:func:`regex_problem`);
one whose estimate exceeds :data:`MAX_REGEX_COST` steps, as nested or stacked
repeats such as ``(a+)+``, ``(x|y)*`` or ``.*a.*a.*a.*a`` do, is refused with
its location. A value longer than that length, or a multi-valued attribute
with more than :data:`MAX_MATCHED_VALUES` values, fails a regex condition
(with that reason) without being matched.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import logging
import math
import operator
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydicom.datadict import REPEATER_KEYWORDS, dictionary_VR, keyword_dict

from pacs_node.config.model import PipelineSettings, RouteSettings, Settings
from pacs_node.errors import RuleError

logger = logging.getLogger(__name__)

NODE_MANUFACTURER = "pacs-node"
"""Manufacturer written into every object the node produces; the loop guard keys on it."""

COMBINATORS = ("all", "any", "not")

SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)

NON_IMAGE_MODALITIES: frozenset[str] = frozenset(
    {"SEG", "SR", "PR", "KO", "RTSTRUCT", "DOC", "REG", "RTPLAN", "RTRECORD", "FID"}
)

NON_IMAGE_SOP_CLASS_PREFIXES: tuple[tuple[str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.88.", "structured report / key object selection"),
    ("1.2.840.10008.5.1.4.1.1.66", "segmentation / registration / fiducials"),
    ("1.2.840.10008.5.1.4.1.1.11.", "presentation state"),
    ("1.2.840.10008.5.1.4.1.1.104.", "encapsulated document"),
    ("1.2.840.10008.5.1.4.1.1.481.", "radiotherapy object"),
)
"""SOP class UID prefixes of non-image objects, guarded even when Modality is absent or odd."""

LOCALIZER_WORDS: frozenset[str] = frozenset(
    {
        "localizer",
        "localizers",
        "localiser",
        "localisers",
        "loc",
        "locs",
        "scout",
        "scouts",
        "survey",
        "surview",
        "topogram",
        "scanogram",
        "tripilot",
    }
)
"""Words (whole, case-insensitive) of a SeriesDescription/ProtocolName naming a localizer."""

_LOCALIZER_PHRASES: tuple[tuple[str, ...], ...] = (("tri", "pilot"), ("3", "plane", "pilot"))

_CMP_RE = re.compile(r"\s*(<=|>=|==|!=|<|>)\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*")
_CMP_PREFIX_RE = re.compile(r"\s*(<=|>=|==|!=|<|>)")
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
    "==": operator.eq,
    "!=": operator.ne,
}
_UNMATCHABLE_VRS = frozenset({"SQ", "OB", "OW", "OF", "OD", "OL", "OV", "UN", "OB or OW", "OW or OB"})
_IDENTIFYING_KEYWORDS = frozenset(
    {
        "PatientID",
        "OtherPatientIDs",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientBirthTime",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "AccessionNumber",
        "MedicalRecordLocator",
        "PatientComments",
        "StudyID",
    }
)
_MAX_SHOWN = 80

MAX_PATTERN_LENGTH = 256
"""Longest regular expression a condition may hold."""
MAX_MATCHED_LENGTH = 1024
"""Longest value any regex condition is tried on (attributes of longer VRs included)."""
MAX_MATCHED_VALUES = 16
"""Most values of a multi-valued attribute a regex condition is tried on."""
MAX_REGEX_COST = 10**7
"""Largest worst-case estimate (:func:`regex_problem`) of a pattern: a few hundred milliseconds at most (measured)."""
_MIN_MATCHED_LENGTH = 64
# Longest value of a VR in characters (PS3.5 Table 6.2-1); others (LT, UT, UC, UR, unknown) get MAX_MATCHED_LENGTH.
_VR_LENGTH = {"AE": 16, "AS": 4, "CS": 16, "DA": 18, "DS": 16, "DT": 54, "IS": 12, "LO": 64, "PN": 194, "SH": 16}
_VR_LENGTH.update({"ST": 1024, "TM": 28, "UI": 64, "US": 5, "SS": 6, "UL": 10, "SL": 11, "FL": 24, "FD": 24})
# The parser of the re module (private: re._parser from 3.11, sre_parse before); used only to estimate cost.
try:
    _sre_parser: Any = importlib.import_module("re._parser")
except ImportError:  # pragma: no cover - Python 3.10
    _sre_parser = importlib.import_module("sre_parse")


# -- results ---------------------------------------------------------------------


@dataclass(frozen=True)
class MatchResult:
    """The outcome of evaluating a matcher on a header.

    Attributes:
        matched: whether the header satisfies the matcher.
        failures: why not, one human-readable reason per failed condition.
        successes: the conditions that held (used to explain ``not``).
    """

    matched: bool
    failures: list[str] = field(default_factory=list)
    successes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RouteMatch:
    """A route that matched a series.

    Attributes:
        route: the route's settings.
        index: the route's position in ``routes`` (config order).
        roles: the input roles of the route's pipeline that the series fills
            (never empty: a series that fills no role does not match).
        notes: remarks such as AE conditions that could not be checked.
    """

    route: RouteSettings
    index: int
    roles: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RouteMiss:
    """A route that did not match a series, and why.

    Attributes:
        route: the route's settings.
        index: the route's position in ``routes`` (config order).
        failures: the failed conditions, in words.
        notes: remarks such as AE conditions that could not be checked.
    """

    route: RouteSettings
    index: int
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesDecision:
    """What the rules decide for one series.

    Attributes:
        guard: why the series is never routed (loop guard), or ``None``.
        matches: the routes that match, in config order (empty when guarded).
        misses: the routes that do not match, nearest miss (fewest failures) first.
    """

    guard: str | None
    matches: list[RouteMatch] = field(default_factory=list)
    misses: list[RouteMiss] = field(default_factory=list)

    @property
    def routed(self) -> bool:
        """Whether at least one route takes the series."""
        return self.guard is None and bool(self.matches)


# -- value formatting ----------------------------------------------------------------


@functools.cache
def _keyword_table() -> dict[str, tuple[str, int]]:
    """keyword -> (VR, group) for every keyword in pydicom's dictionary."""
    table: dict[str, tuple[str, int]] = {}
    for keyword, tag in keyword_dict.items():
        if keyword:
            table[keyword] = (dictionary_VR(tag), tag >> 16)
    for keyword in REPEATER_KEYWORDS:
        # Repeating groups (overlays, curves): VR unknown here, never file meta.
        table.setdefault(keyword, ("", 0xFFFF))
    return table


@functools.cache
def _lower_keywords() -> dict[str, str]:
    return {kw.lower(): kw for kw in _keyword_table()}


def _is_identifying(keyword: str) -> bool:
    if keyword in _IDENTIFYING_KEYWORDS:
        return True
    entry = _keyword_table().get(keyword)
    return entry is not None and entry[0] == "PN"


def _quote(text: str) -> str:
    """Quote text as the administrator wrote it (no backslash doubling, unlike repr)."""
    return "'" + text + "'"


def _fmt_scalar(value: Any) -> str:
    if isinstance(value, str):
        if len(value) > _MAX_SHOWN:
            value = value[: _MAX_SHOWN - 3] + "..."
        return _quote(value)
    return repr(value)


def _fmt(keyword: str, value: Any) -> str:
    """Show a header value in a reason; identifying values are hidden."""
    if _is_identifying(keyword):
        return "<hidden>"
    if isinstance(value, list | tuple):
        return "[" + ",".join(_fmt_scalar(v) for v in value) + "]"
    return _fmt_scalar(value)


def _is_missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, list | tuple) and len(value) == 0)


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _regex_texts(value: Any) -> list[str]:
    """The text forms a regex condition is tried against (``5.0`` also as ``5``)."""
    if isinstance(value, float):
        texts = [repr(value)]
        if value.is_integer():
            texts.append(str(int(value)))
        return texts
    return [str(value)]


# -- conditions ----------------------------------------------------------------------


class _Condition(ABC):
    """One condition on one attribute's value."""

    @abstractmethod
    def describe(self) -> str:
        """The condition as an administrator wrote it."""

    @abstractmethod
    def test(self, keyword: str, value: Any) -> tuple[bool, str]:
        """Test a present value; returns (holds, reason in words)."""

    def test_missing(self, keyword: str) -> tuple[bool, str]:
        """Test an absent attribute; only ``false`` holds."""
        return False, f"{keyword} is missing"


class _Regex(_Condition):
    def __init__(self, text: str, pattern: re.Pattern[str], max_length: int = MAX_MATCHED_LENGTH) -> None:
        self.text = text
        self.pattern = pattern
        self.max_length = max_length

    def describe(self) -> str:
        return _quote(self.text)

    def _hit(self, value: Any) -> bool:
        return any(self.pattern.fullmatch(t) for t in _regex_texts(value))

    def _unmatchable(self, keyword: str, value: Any) -> str | None:
        """Why the value is not tried at all: too many values, or one too long (the pattern's cost bound)."""
        items = list(value) if isinstance(value, list | tuple) else [value]
        if len(items) > MAX_MATCHED_VALUES:
            return (
                f"{keyword} has {len(items)} values, more than the {MAX_MATCHED_VALUES} a pattern is tried on, "
                f"so it does not match {self.describe()}"
            )
        longest = max(len(t) for item in items for t in _regex_texts(item))
        if longest > self.max_length:
            return (
                f"{keyword} has a value of {longest} characters, longer than the {self.max_length} a pattern is "
                f"tried on for it, so it does not match {self.describe()}"
            )
        return None

    def test(self, keyword: str, value: Any) -> tuple[bool, str]:
        refused = self._unmatchable(keyword, value)
        if refused is not None:
            return False, refused
        shown = _fmt(keyword, value)
        if isinstance(value, list | tuple):
            for item in value:
                if self._hit(item):
                    return (
                        True,
                        f"{keyword} {shown} has value {_fmt(keyword, item)} matching {self.describe()}",
                    )
            return False, f"{keyword} {shown} has no value matching {self.describe()}"
        if self._hit(value):
            return True, f"{keyword} {shown} fully matches {self.describe()}"
        return False, f"{keyword} {shown} does not fully match {self.describe()}"


class _Compare(_Condition):
    def __init__(self, op: str, number: float, text: str) -> None:
        self.op = op
        self.number = number
        self.text = text
        self.fn = _OPERATORS[op]

    def describe(self) -> str:
        return f"{self.op} {self.text}"

    def _holds(self, shown: str, keyword: str) -> str:
        if self.op == "==":
            return f"{keyword} {shown} equals {self.text}"
        return f"{keyword} {shown} is {self.op} {self.text}"

    def _fails(self, shown: str, keyword: str) -> str:
        if self.op == "==":
            return f"{keyword} {shown} is not equal to {self.text}"
        if self.op == "!=":
            return f"{keyword} {shown} equals {self.text} (wanted != {self.text})"
        return f"{keyword} {shown} is not {self.op} {self.text}"

    def test(self, keyword: str, value: Any) -> tuple[bool, str]:
        shown = _fmt(keyword, value)
        items = list(value) if isinstance(value, list | tuple) else [value]
        numbers = [n for n in (_as_number(v) for v in items) if n is not None]
        if not numbers:
            return False, f"{keyword} {shown} is not a number, so it cannot be compared ({self.describe()})"
        if isinstance(value, list | tuple):
            for number in numbers:
                if self.fn(number, self.number):
                    return True, f"{keyword} {shown} has a value {self.describe()}"
            return False, f"{keyword} {shown} has no value {self.describe()}"
        if self.fn(numbers[0], self.number):
            return True, self._holds(shown, keyword)
        return False, self._fails(shown, keyword)


class _Presence(_Condition):
    def __init__(self, present: bool) -> None:
        self.present = present

    def describe(self) -> str:
        return "present (true)" if self.present else "absent (false)"

    def test(self, keyword: str, value: Any) -> tuple[bool, str]:
        if self.present:
            return True, f"{keyword} is present"
        return False, f"{keyword} is present ({_fmt(keyword, value)}) but must be absent"

    def test_missing(self, keyword: str) -> tuple[bool, str]:
        if self.present:
            return False, f"{keyword} is missing"
        return True, f"{keyword} is absent"


class _AnyOf(_Condition):
    def __init__(self, options: list[_Condition]) -> None:
        self.options = options

    def describe(self) -> str:
        return "any of " + ", ".join(o.describe() for o in self.options)

    def test(self, keyword: str, value: Any) -> tuple[bool, str]:
        for option in self.options:
            ok, reason = option.test(keyword, value)
            if ok:
                return True, reason
        alternatives = ", ".join(o.describe() for o in self.options)
        return False, f"{keyword} {_fmt(keyword, value)} matches none of {alternatives}"

    def test_missing(self, keyword: str) -> tuple[bool, str]:
        for option in self.options:
            ok, reason = option.test_missing(keyword)
            if ok:
                return True, reason
        return False, f"{keyword} is missing"


# -- matcher nodes ---------------------------------------------------------------------


class _Node(ABC):
    @abstractmethod
    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        """Evaluate on a header."""


class _KeyNode(_Node):
    def __init__(self, keyword: str, condition: _Condition) -> None:
        self.keyword = keyword
        self.condition = condition

    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        value = header.get(self.keyword)
        if _is_missing(value):
            ok, reason = self.condition.test_missing(self.keyword)
        else:
            ok, reason = self.condition.test(self.keyword, value)
        return MatchResult(ok, [] if ok else [reason], [reason] if ok else [])


class _AllNode(_Node):
    def __init__(self, children: list[_Node]) -> None:
        self.children = children

    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        failures: list[str] = []
        successes: list[str] = []
        for child in self.children:
            result = child.evaluate(header)
            failures.extend(result.failures)
            successes.extend(result.successes)
        return MatchResult(not failures, failures, successes)


class _AnyNode(_Node):
    def __init__(self, children: list[_Node]) -> None:
        self.children = children

    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        results = []
        for child in self.children:
            result = child.evaluate(header)
            if result.matched:
                return MatchResult(True, [], result.successes)
            results.append(result)
        branches = " or ".join("(" + "; ".join(r.failures) + ")" for r in results)
        return MatchResult(False, [f"none of the 'any' alternatives matched: {branches}"], [])


class _NotNode(_Node):
    def __init__(self, child: _Node) -> None:
        self.child = child

    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        result = self.child.evaluate(header)
        if result.matched:
            return MatchResult(False, ["excluded by 'not': " + "; ".join(result.successes)], [])
        return MatchResult(True, [], ["not (" + "; ".join(result.failures) + ")"])


class CompiledMatcher:
    """A validated matcher, ready to evaluate headers.

    Build one with :func:`compile_matcher`.
    """

    def __init__(self, node: _Node, source: Mapping[str, Any], location: str) -> None:
        self._node = node
        self.source: Mapping[str, Any] = source
        self.location = location

    @property
    def empty(self) -> bool:
        """Whether the matcher has no conditions (it matches every header)."""
        return not self.source

    def evaluate(self, header: Mapping[str, Any]) -> MatchResult:
        """Evaluate on a header dict (see :mod:`pacs_node.common.header`).

        Raises:
            Nothing: a missing or odd value fails its condition with a reason.
        """
        return self._node.evaluate(header)

    def __repr__(self) -> str:
        return f"CompiledMatcher({self.location}: {dict(self.source)!r})"


# -- compiling ---------------------------------------------------------------------


def _suggest(key: str) -> str | None:
    lowered = _lower_keywords()
    if key.lower() in lowered:
        return lowered[key.lower()]
    if key.lower() in COMBINATORS:
        return key.lower()
    close = difflib.get_close_matches(key.lower(), list(lowered) + list(COMBINATORS), n=1, cutoff=0.75)
    if close:
        return lowered.get(close[0], close[0])
    return None


def _check_keyword(key: str, loc: str) -> str | None:
    """An error message for a key that is not a usable DICOM keyword, else None."""
    entry = _keyword_table().get(key)
    if entry is None:
        if key.lower().replace("_", "") in ("callingae", "calledae", "callingaetitle", "calledaetitle"):
            return (
                f"{loc}: unknown DICOM keyword (AE titles are not header attributes: set "
                f"calling_ae / called_ae on the route, beside match)"
            )
        hint = _suggest(key)
        return f"{loc}: unknown DICOM keyword" + (f" (did you mean {hint}?)" if hint else "")
    vr, group = entry
    if group <= 0x0002:
        return f"{loc}: {key} is a file meta / command attribute; rules see only the dataset's own attributes"
    if vr in _UNMATCHABLE_VRS:
        kind = "a sequence (SQ)" if vr == "SQ" else f"binary data (VR {vr})"
        return f"{loc}: {key} is {kind}; rules can test only top-level text and number attributes"
    return None


def _compile_condition(key: str, raw: Any, loc: str, errors: list[str], *, in_list: bool = False) -> _Condition | None:
    if isinstance(raw, bool):
        return _Presence(raw)
    if isinstance(raw, int | float):
        if not math.isfinite(raw):
            errors.append(f"{loc}: {raw!r} is not a usable number")
            return None
        return _Compare("==", float(raw), str(raw))
    if isinstance(raw, str):
        cmp = _CMP_RE.fullmatch(raw)
        if cmp:
            return _Compare(cmp.group(1), float(cmp.group(2)), cmp.group(2))
        if _CMP_PREFIX_RE.match(raw):
            errors.append(
                f"{loc}: {raw!r} starts with a comparison operator but no number follows "
                f"(write e.g. '<= 5'; to match the text itself, escape the first character: "
                f"'\\{raw.lstrip()}')"
            )
            return None
        if raw == "":
            errors.append(f"{loc}: an empty pattern never matches a present value (use false to require absence)")
            return None
        pattern = _compile_regex(raw, match_length(key), loc, errors)
        return _Regex(raw, pattern, match_length(key)) if pattern is not None else None
    if isinstance(raw, list | tuple):
        if in_list:
            errors.append(f"{loc}: lists of conditions cannot be nested")
            return None
        if not raw:
            errors.append(f"{loc}: an empty list of conditions never matches; remove {key} or give conditions")
            return None
        options = [_compile_condition(key, item, f"{loc}[{i}]", errors, in_list=True) for i, item in enumerate(raw)]
        if any(o is None for o in options):
            return None
        return _AnyOf([o for o in options if o is not None])
    if raw is None:
        errors.append(f"{loc}: no condition given (write a pattern, a number, true/false or a list of those)")
        return None
    if isinstance(raw, Mapping):
        errors.append(
            f"{loc}: a condition is a pattern, a number, true/false or a list of those, not a mapping "
            f"(to combine conditions, put mappings under all / any / not)"
        )
        return None
    errors.append(f"{loc}: unsupported condition of type {type(raw).__name__}")
    return None


def _compile_mapping(matcher: Any, loc: str, errors: list[str], *, nested: bool) -> _Node | None:
    if not isinstance(matcher, Mapping):
        errors.append(f"{loc}: expected a mapping of DICOM keywords to conditions, not {type(matcher).__name__}")
        return None
    if nested and not matcher:
        errors.append(f"{loc}: an empty matcher here matches everything; give at least one condition")
        return None
    children: list[_Node] = []
    ok = True
    for key, raw in matcher.items():
        key_loc = f"{loc}.{key}"
        if not isinstance(key, str):
            errors.append(f"{key_loc}: keys must be DICOM keywords or all/any/not")
            ok = False
            continue
        if key in ("all", "any"):
            if not isinstance(raw, list | tuple) or not raw:
                errors.append(
                    f"{key_loc}: expected a non-empty list of matchers, e.g. {key}: [{{Modality: MR}}, {{...}}]"
                )
                ok = False
                continue
            subs = [_compile_mapping(item, f"{key_loc}[{i}]", errors, nested=True) for i, item in enumerate(raw)]
            if any(s is None for s in subs):
                ok = False
                continue
            nodes = [s for s in subs if s is not None]
            children.append(_AllNode(nodes) if key == "all" else _AnyNode(nodes))
            continue
        if key == "not":
            sub = _compile_mapping(raw, key_loc, errors, nested=True)
            if sub is None:
                ok = False
                continue
            children.append(_NotNode(sub))
            continue
        problem = _check_keyword(key, key_loc)
        if problem:
            errors.append(problem)
            ok = False
            continue
        condition = _compile_condition(key, raw, key_loc, errors)
        if condition is None:
            ok = False
            continue
        children.append(_KeyNode(key, condition))
    if not ok:
        return None
    return children[0] if len(children) == 1 else _AllNode(children)


def _raise_errors(errors: list[str], what: str) -> None:
    if not errors:
        return
    if len(errors) == 1:
        raise RuleError(errors[0])
    raise RuleError(f"{len(errors)} problems in {what}:\n" + "\n".join(f"  {e}" for e in errors))


def compile_matcher(matcher: Mapping[str, Any], location: str = "match") -> CompiledMatcher:
    """Validate and compile one matcher.

    Args:
        matcher: the ``match`` mapping (keywords or all/any/not -> conditions).
        location: where it sits in the configuration, used in error messages
            (e.g. ``routes[2].match``).

    Raises:
        RuleError: an unknown keyword (with a suggestion), an invalid regex, a
            malformed condition or combinator; every problem is listed with its
            location.
    """
    errors: list[str] = []
    node = _compile_mapping(matcher, location, errors, nested=False)
    _raise_errors(errors, location)
    if node is None:  # not reached: a failed compile always records an error
        raise RuleError(f"{location}: cannot compile matcher")
    return CompiledMatcher(node, matcher, location)


def _compile_ae(pattern: str | None, loc: str, errors: list[str]) -> re.Pattern[str] | None:
    if pattern is None:
        return None
    return _compile_regex(pattern, _MIN_MATCHED_LENGTH, loc, errors)


def _compile_regex(text: str, max_length: int, loc: str, errors: list[str]) -> re.Pattern[str] | None:
    """A case-insensitive pattern, or None with the problem in ``errors`` (invalid, or unbounded in time)."""
    try:
        pattern = re.compile(text, re.IGNORECASE)
    except re.error as exc:
        errors.append(f"{loc}: invalid regular expression {text!r}: {exc}")
        return None
    problem = regex_problem(text, max_length)
    if problem is not None:
        errors.append(f"{loc}: {problem}")
        return None
    return pattern


def match_length(keyword: str) -> int:
    """Longest value (in characters) a regex condition on ``keyword`` is tried on: the longest its VR allows,
    at least 64 (some writers overrun short VRs) and at most :data:`MAX_MATCHED_LENGTH`."""
    entry = _keyword_table().get(keyword)
    vr_length = _VR_LENGTH.get(entry[0], MAX_MATCHED_LENGTH) if entry else MAX_MATCHED_LENGTH
    return min(max(vr_length, _MIN_MATCHED_LENGTH), MAX_MATCHED_LENGTH)


class _TooCostly(Exception):
    """A construct that has no bound (a backreference)."""


def _log_cost(items: Any, length: int) -> float:
    """log10 of how many ways, at worst, a backtracking matcher may try to fit ``items`` (a parsed
    (sub)pattern) to a value of ``length`` characters: repeats multiply by how many counts they can take
    (their subpattern's ways to that power), alternatives add up."""
    total = 0.0
    for op, av in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, sub = av
            high = min(high, length)
            inner = _log_cost(sub, length)
            spread = max(1, high - low + 1)
            total += math.log10(spread) + (high * inner if inner > 0 else 0.0)
        elif name == "SUBPATTERN":
            total += _log_cost(av[-1], length)
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += _log_cost(av[1], length)
        elif name == "ATOMIC_GROUP":
            total += _log_cost(av, length)
        elif name == "BRANCH":
            costs = [_log_cost(alt, length) for alt in av[1]]
            total += max(costs) + math.log10(len(costs))
        elif name.startswith("GROUPREF"):
            raise _TooCostly("backreferences (\\1, (?P=name), (?(1)...)) are not supported in rules")
    return total


def regex_problem(text: str, max_length: int = MAX_MATCHED_LENGTH) -> str | None:
    """Why a rule's regular expression could run too long, or None when it is bounded.

    The worst case is estimated on a value of ``max_length`` characters (:func:`_log_cost`): a pattern
    above :data:`MAX_REGEX_COST` ways, or longer than :data:`MAX_PATTERN_LENGTH`, or with a backreference,
    is refused. The estimate is pessimistic for patterns whose repeats are separated by literal text.

    Raises:
        re.error: ``text`` is not a valid pattern.
    """
    if len(text) > MAX_PATTERN_LENGTH:
        return f"the pattern is {len(text)} characters long; rules take patterns of up to {MAX_PATTERN_LENGTH}"
    try:
        log_cost = _log_cost(_sre_parser.parse(text, re.IGNORECASE), max_length)
    except _TooCostly as exc:
        return f"the pattern {_quote(text)} uses {exc}"
    if log_cost > math.log10(MAX_REGEX_COST):
        return (
            f"the pattern {_quote(text)} could take too long on a {max_length}-character value "
            f"(about 10^{log_cost:.0f} tries at worst, more than 10^{math.log10(MAX_REGEX_COST):.0f}): "
            "avoid repeats inside repeats such as (a+)+ or (x|y)*, and many repeats in a row such as "
            ".*a.*b.*c.*d; a repeat that only surrounds the pattern, as in .*(dwi|trace).*, is fine"
        )
    return None


@dataclass(frozen=True)
class _CompiledRoute:
    index: int
    settings: RouteSettings
    matcher: CompiledMatcher | None
    calling_ae: re.Pattern[str] | None
    called_ae: re.Pattern[str] | None


class CompiledRules:
    """The routes and pipeline inputs of a :class:`~pacs_node.config.Settings`, compiled.

    Build with :func:`compile_settings`; evaluate headers with :meth:`evaluate`.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        routes: Sequence[_CompiledRoute],
        inputs: Mapping[str, Mapping[str, CompiledMatcher]],
    ) -> None:
        self.settings = settings
        self._routes = tuple(routes)
        self._inputs = {name: dict(roles) for name, roles in inputs.items()}

    def _pipeline_inputs(self, pipeline_name: str) -> dict[str, CompiledMatcher]:
        try:
            return self._inputs[pipeline_name]
        except KeyError:
            raise RuleError(f"unknown pipeline {pipeline_name!r} (known: {sorted(self._inputs) or 'none'})") from None

    def evaluate_roles(self, pipeline_name: str, header: Mapping[str, Any]) -> dict[str, MatchResult]:
        """Evaluate every input role of a pipeline on a header, in config order.

        Raises:
            RuleError: ``pipeline_name`` is not a configured pipeline.
        """
        return {role: m.evaluate(header) for role, m in self._pipeline_inputs(pipeline_name).items()}

    def role_matches(self, pipeline_name: str, header: Mapping[str, Any]) -> list[str]:
        """The roles of a pipeline whose input matcher the header satisfies.

        An input with an empty ``match`` matches every header.

        Raises:
            RuleError: ``pipeline_name`` is not a configured pipeline.
        """
        return [role for role, result in self.evaluate_roles(pipeline_name, header).items() if result.matched]

    def evaluate(
        self,
        header: Mapping[str, Any],
        *,
        calling_ae: str | None = None,
        called_ae: str | None = None,
    ) -> SeriesDecision:
        """Decide which routes take a series.

        The loop guard is checked first; a guarded series matches nothing. A route
        takes a series when its ``match`` holds (an empty one always does) *and*
        the series fills at least one input role of the route's pipeline, so a
        route never sends a pipeline a series it cannot use (with the default
        single input, whose match is empty, every series fills it). When no role
        fits, the nearest role's failures are reported, prefixed with the role.
        AE conditions are checked only when the AE is known: with ``None`` (the
        offline tester) they are noted as not checked.

        Args:
            header: the series header (see :func:`pacs_node.common.header.header_from_dataset`).
            calling_ae: AE title of the sender, if known.
            called_ae: AE title the sender called us by, if known.

        Raises:
            Nothing: every problem with a header is a failure reason.
        """
        guard = loop_guard(header)
        if guard is not None:
            logger.debug("series %s never routed: %s", header.get("SeriesInstanceUID"), guard)
            return SeriesDecision(guard=guard)
        matches: list[RouteMatch] = []
        misses: list[RouteMiss] = []
        for route in self._routes:
            failures, notes, roles = self._route_failures(route, header, calling_ae, called_ae)
            if failures:
                misses.append(RouteMiss(route.settings, route.index, failures, notes))
            else:
                matches.append(RouteMatch(route.settings, route.index, roles, notes))
        misses.sort(key=lambda miss: len(miss.failures))
        logger.debug(
            "series %s: routes %s match",
            header.get("SeriesInstanceUID"),
            [m.route.name for m in matches] or "none",
        )
        return SeriesDecision(guard=None, matches=matches, misses=misses)

    def _route_failures(
        self,
        route: _CompiledRoute,
        header: Mapping[str, Any],
        calling_ae: str | None,
        called_ae: str | None,
    ) -> tuple[list[str], list[str], list[str]]:
        failures: list[str] = []
        notes: list[str] = []
        pipeline = route.settings.pipeline
        role_results = self.evaluate_roles(pipeline, header)
        roles = [role for role, result in role_results.items() if result.matched]
        if route.matcher is not None:
            failures.extend(route.matcher.evaluate(header).failures)
        if not roles and failures:
            # The route's own conditions already fail: one line is enough here.
            failures.append(f"it also fills no input of pipeline {pipeline!r} ({', '.join(role_results)})")
        elif not roles:
            nearest_role, nearest = min(role_results.items(), key=lambda item: len(item[1].failures))
            failures.extend(f"pipeline input {nearest_role!r}: {f}" for f in nearest.failures)
        for label, pattern, actual in (
            ("calling AE", route.calling_ae, calling_ae),
            ("called AE", route.called_ae, called_ae),
        ):
            if pattern is None:
                continue
            if actual is None:
                notes.append(f"{label} not checked (unknown here); the route requires {_quote(pattern.pattern)}")
            elif not pattern.fullmatch(actual.strip()):
                failures.append(f"{label} {_quote(actual.strip())} does not fully match {_quote(pattern.pattern)}")
        return failures, notes, roles


def compile_settings(settings: Settings) -> CompiledRules:
    """Compile every route and pipeline input matcher of ``settings``.

    Called by :func:`pacs_node.config.settings_from_mapping`, so that bad rules
    are reported when the configuration loads.

    Raises:
        RuleError: listing every bad matcher or AE regex with its location, e.g.
            ``routes[2].match.SeriesDescriptoin: unknown DICOM keyword (did you
            mean SeriesDescription?)``.
    """
    errors: list[str] = []
    inputs: dict[str, dict[str, CompiledMatcher]] = {}
    for name, pipeline in settings.pipelines.items():
        inputs[name] = _compile_inputs(name, pipeline, errors)
    routes: list[_CompiledRoute] = []
    for i, route in enumerate(settings.routes):
        loc = f"routes[{i}]"
        matcher: CompiledMatcher | None = None
        if route.match:
            node = _compile_mapping(route.match, f"{loc}.match", errors, nested=False)
            matcher = CompiledMatcher(node, route.match, f"{loc}.match") if node is not None else None
        calling = _compile_ae(route.calling_ae, f"{loc}.calling_ae", errors)
        called = _compile_ae(route.called_ae, f"{loc}.called_ae", errors)
        routes.append(_CompiledRoute(i, route, matcher, calling, called))
    _raise_errors(errors, "the routing rules")
    logger.debug("compiled %d routes and %d pipelines", len(routes), len(inputs))
    return CompiledRules(settings, routes=routes, inputs=inputs)


def _compile_inputs(name: str, pipeline: PipelineSettings, errors: list[str]) -> dict[str, CompiledMatcher]:
    compiled: dict[str, CompiledMatcher] = {}
    for role, spec in pipeline.inputs.items():
        loc = f"pipelines.{name}.inputs.{role}.match"
        node = _compile_mapping(spec.match, loc, errors, nested=False)
        if node is not None:
            compiled[role] = CompiledMatcher(node, spec.match, loc)
    return compiled


# -- loop guard ---------------------------------------------------------------------


def _texts(value: Any) -> list[str]:
    if _is_missing(value):
        return []
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _name_tokens(name: str) -> list[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return [t for t in re.split(r"[^a-z0-9]+", spaced.lower()) if t]


def is_localizer_name(name: str) -> bool:
    """Whether a series description / protocol name names a localizer or scout.

    Words are split at anything not a letter or digit (``_``, ``-``, spaces) and
    at camel-case boundaries, so ``AAHead_Scout``, ``3-Plane Loc``,
    ``Topogram 0.6 T20s`` and ``SmartSurvey`` are localizers while ``Block`` or
    ``Allocation`` are not.
    """
    tokens = _name_tokens(name)
    if any(t in LOCALIZER_WORDS for t in tokens):
        return True
    for phrase in _LOCALIZER_PHRASES:
        n = len(phrase)
        if any(tuple(tokens[i : i + n]) == phrase for i in range(len(tokens) - n + 1)):
            return True
    return False


def loop_guard(header: Mapping[str, Any]) -> str | None:
    """Why a series must never be routed, or ``None`` when it may be.

    Checked before any rule. Never routed: objects pacs-node produced (Manufacturer
    or SoftwareVersions naming :data:`NODE_MANUFACTURER`), non-image objects
    (Modality SEG, SR, PR, KO, RTSTRUCT, DOC, ...), Secondary Captures (the SC SOP
    class family) and Modality OT, and localizers/scouts (ImageType LOCALIZER, or
    a localizer word in SeriesDescription / ProtocolName).

    Raises:
        Nothing: missing attributes simply do not trigger the guard.
    """
    for keyword in ("Manufacturer", "SoftwareVersions"):
        for text in _texts(header.get(keyword)):
            if NODE_MANUFACTURER in text.lower():
                return (
                    f"produced by {NODE_MANUFACTURER} ({keyword} {_quote(text)}); "
                    f"the node never routes its own results back into a pipeline"
                )
    modality = next(iter(_texts(header.get("Modality"))), "").strip().upper()
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image object (Modality {modality}); only image series are routed"
    sop_class = next(iter(_texts(header.get("SOPClassUID"))), "").strip()
    for prefix, kind in NON_IMAGE_SOP_CLASS_PREFIXES:
        if sop_class.startswith(prefix):
            return f"non-image object ({kind}, SOPClassUID {sop_class}); only image series are routed"
    if sop_class in SECONDARY_CAPTURE_SOP_CLASSES:
        return f"Secondary Capture (SOPClassUID {sop_class}); screenshots and key images are not routed"
    if modality == "OT":
        return "Modality OT (other: usually a screenshot or a scanned document)"
    if any(t.strip().upper() == "LOCALIZER" for t in _texts(header.get("ImageType"))):
        return "localizer/scout (ImageType contains LOCALIZER)"
    for keyword in ("SeriesDescription", "ProtocolName"):
        for text in _texts(header.get(keyword)):
            if is_localizer_name(text):
                return f"localizer/scout ({keyword} {_quote(text)})"
    return None
