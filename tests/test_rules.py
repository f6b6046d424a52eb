"""Tests of the routing rule engine (pacs_node.config.rules) and header summaries (pacs_node.common.header)."""

from __future__ import annotations

import copy
import json
import re
import time
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pacs_node.common.header import HeaderError, NotDicomError, header_from_dataset, header_from_file
from pacs_node.config import Settings, settings_from_mapping
from pacs_node.config.rules import (
    MAX_MATCHED_VALUES,
    MAX_PATTERN_LENGTH,
    NODE_MANUFACTURER,
    CompiledRules,
    compile_matcher,
    compile_settings,
    is_localizer_name,
    loop_guard,
    match_length,
)
from pacs_node.errors import ConfigError, RuleError
from pacs_node.route.tester import rules_report

MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
ENHANCED_MR = "1.2.840.10008.5.1.4.1.1.4.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"

# A realistic configuration, as an administrator would write it in YAML.
CONFIG: dict[str, Any] = {
    "destinations": {
        "pacs": {"type": "dimse", "host": "127.0.0.1", "port": 104, "ae_title": "PACS"},
        "viewer": {"type": "dicomweb", "url": "http://127.0.0.1:8042/dicom-web"},
    },
    "pipelines": {
        "stroke": {
            "model": "models/stroke",
            "inputs": {
                "dwi": {
                    "match": {
                        "Modality": "MR",
                        "any": [
                            {"SeriesDescription": [".*dwi.*", ".*diff.*", ".*trace.*"]},
                            {"ImageType": "TRACEW"},
                        ],
                        "not": {
                            "any": [
                                {"SeriesDescription": ".*(adc|apparent|exponential).*"},
                                {"ImageType": ["ADC", "EADC", "FA"]},
                            ]
                        },
                    }
                },
                "adc": {
                    "match": {
                        "Modality": "MR",
                        "any": [
                            {"SeriesDescription": [".*adc.*", "apparent diffusion.*"]},
                            {"ImageType": "ADC"},
                        ],
                    }
                },
                "flair": {
                    "required": False,
                    "match": {"Modality": "MR", "SeriesDescription": [".*flair.*", ".*dark[-_ ]?fluid.*"]},
                },
            },
        },
        "dentate": {
            "model": "models/dentate",
            "inputs": {
                "qsm": {
                    "match": {
                        "Modality": "MR",
                        "any": [{"SeriesDescription": ".*qsm.*"}, {"ImageType": "QSM"}],
                    }
                }
            },
        },
        "kidney": {
            "model": "models/kidney",
            "inputs": {
                "image": {
                    "match": {
                        "any": [
                            {
                                "Modality": "CT",
                                "SeriesDescription": [
                                    r".*\bpv\b.*",
                                    ".*portal.*",
                                    ".*venous.*",
                                    ".*nephro.*",
                                ],
                                "not": {"SeriesDescription": ".*arterial.*"},
                            },
                            {"Modality": "MR", "SeriesDescription": ".*t2.*(fs|spair|spir|fat.?sat).*"},
                        ]
                    }
                }
            },
        },
    },
    "routes": [
        {
            "name": "stroke",
            "pipeline": "stroke",
            "calling_ae": r"MR\d*|PACS",
            "priority": "stat",
            "destinations": ["pacs", "viewer"],
        },
        {"name": "dentate-research", "pipeline": "dentate", "priority": "low", "destinations": ["viewer"]},
        {
            "name": "kidney-ct",
            "pipeline": "kidney",
            "match": {"Modality": "CT", "SliceThickness": "<= 5", "BodyPartExamined": ["ABDOMEN", "KIDNEY"]},
            "destinations": ["pacs"],
        },
        {
            "name": "kidney-mr",
            "pipeline": "kidney",
            "match": {"Modality": "MR", "BodyPartExamined": ["ABDOMEN", "KIDNEY"]},
            "destinations": ["pacs"],
        },
    ],
}


@pytest.fixture(scope="module")
def settings() -> Settings:
    return settings_from_mapping(CONFIG)


@pytest.fixture(scope="module")
def rules(settings: Settings) -> CompiledRules:
    return compile_settings(settings)


def config_with(**changes: Any) -> dict[str, Any]:
    data = copy.deepcopy(CONFIG)
    data.update(changes)
    return data


def failures_of(matcher: dict[str, Any], header: dict[str, Any]) -> list[str]:
    result = compile_matcher(matcher)
    assert result.evaluate(header).matched is not bool(result.evaluate(header).failures)
    return result.evaluate(header).failures


def matches(matcher: dict[str, Any], header: dict[str, Any]) -> bool:
    return compile_matcher(matcher).evaluate(header).matched


# -- condition forms -------------------------------------------------------------------


def test_regex_is_case_insensitive_full_match() -> None:
    assert matches({"Modality": "mr"}, {"Modality": "MR"})
    assert matches({"SeriesDescription": "ax dwi"}, {"SeriesDescription": "AX DWI"})
    assert failures_of({"SeriesDescription": "dwi"}, {"SeriesDescription": "AX DWI"}) == [
        "SeriesDescription 'AX DWI' does not fully match 'dwi'"
    ]
    assert failures_of({"SeriesDescription": "dwi|.*diff.*"}, {"SeriesDescription": "AX T2 FLAIR"}) == [
        "SeriesDescription 'AX T2 FLAIR' does not fully match 'dwi|.*diff.*'"
    ]


def test_regex_on_multi_valued_attribute_is_membership() -> None:
    header = {"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}
    assert matches({"ImageType": "localizer"}, header)
    assert matches({"ImageType": "PRIM.*"}, header)
    assert failures_of({"ImageType": "M"}, header) == [
        "ImageType ['ORIGINAL','PRIMARY','LOCALIZER'] has no value matching 'M'"
    ]


def test_regex_on_numbers_uses_their_text() -> None:
    assert matches({"SeriesNumber": "5|6"}, {"SeriesNumber": 5})
    assert matches({"SliceThickness": "5"}, {"SliceThickness": 5.0})
    assert matches({"SliceThickness": r"5\.0"}, {"SliceThickness": 5.0})


@pytest.mark.parametrize(
    ("condition", "value", "expected"),
    [
        ("<= 5", 5.0, True),
        ("<= 5", 4.9, True),
        ("<=5", 7.0, False),
        (" >= 1.5 ", 1.5, True),
        ("< 3", 3, False),
        ("> 3", 3.5, True),
        ("== 2", 2, True),
        ("== 2", 2.5, False),
        ("!= 2", 3, True),
        ("!= 2", 2.0, False),
        ("> -1e3", -10, True),
        ("<= 5", "4.5", True),  # a numeric string (e.g. a JSON header) is a number
    ],
)
def test_numeric_comparisons(condition: str, value: Any, expected: bool) -> None:
    assert matches({"SliceThickness": condition}, {"SliceThickness": value}) is expected


def test_numeric_comparison_reasons() -> None:
    assert failures_of({"SliceThickness": "<= 5"}, {"SliceThickness": 7.0}) == ["SliceThickness 7.0 is not <= 5"]
    assert failures_of({"SliceThickness": "!= 2"}, {"SliceThickness": 2}) == ["SliceThickness 2 equals 2 (wanted != 2)"]
    (reason,) = failures_of({"SliceThickness": "<= 5"}, {"SliceThickness": "thin"})
    assert reason == "SliceThickness 'thin' is not a number, so it cannot be compared (<= 5)"
    assert failures_of({"SliceThickness": "<= 5"}, {}) == ["SliceThickness is missing"]


def test_numeric_comparison_on_multi_valued_attribute() -> None:
    assert matches({"PixelSpacing": "<= 0.6"}, {"PixelSpacing": [0.5, 0.5]})
    assert failures_of({"PixelSpacing": "<= 0.6"}, {"PixelSpacing": [0.9, 0.9]}) == [
        "PixelSpacing [0.9,0.9] has no value <= 0.6"
    ]


def test_plain_number_is_numeric_equality() -> None:
    assert matches({"EchoNumbers": 1}, {"EchoNumbers": 1})
    assert matches({"EchoNumbers": 1}, {"EchoNumbers": 1.0})
    assert matches({"SliceThickness": 2.5}, {"SliceThickness": 2.5})
    assert failures_of({"EchoNumbers": 1}, {"EchoNumbers": 2}) == ["EchoNumbers 2 is not equal to 1"]
    assert not matches({"EchoNumbers": 1}, {"EchoNumbers": "one"})


def test_presence_and_absence() -> None:
    assert matches({"ContrastBolusAgent": True}, {"ContrastBolusAgent": "OMNIPAQUE"})
    assert failures_of({"ContrastBolusAgent": True}, {}) == ["ContrastBolusAgent is missing"]
    assert matches({"ContrastBolusAgent": False}, {})
    assert failures_of({"ContrastBolusAgent": False}, {"ContrastBolusAgent": "OMNIPAQUE"}) == [
        "ContrastBolusAgent is present ('OMNIPAQUE') but must be absent"
    ]
    # an empty value counts as missing
    assert matches({"ContrastBolusAgent": False}, {"ContrastBolusAgent": ""})


def test_missing_attribute_fails_every_condition_but_false() -> None:
    for condition in ("MR", ".*", "<= 5", 3, True, ["MR", "CT"]):
        assert failures_of({"Modality": condition}, {}) == ["Modality is missing"]
    assert matches({"Modality": ["MR", False]}, {})


def test_list_of_conditions_is_any_of() -> None:
    matcher = {"SeriesDescription": ["dwi", ".*trace.*", "<= 3"]}
    assert matches(matcher, {"SeriesDescription": "DWI"})
    assert matches(matcher, {"SeriesDescription": "ep2d_diff_3scan_trace_p2"})
    assert failures_of(matcher, {"SeriesDescription": "AX T2"}) == [
        "SeriesDescription 'AX T2' matches none of 'dwi', '.*trace.*', <= 3"
    ]


def test_several_keys_are_anded_and_all_failures_reported() -> None:
    matcher = {"Modality": "CT", "SliceThickness": "<= 5"}
    assert matches(matcher, {"Modality": "CT", "SliceThickness": 3.0})
    assert failures_of(matcher, {"Modality": "MR", "SliceThickness": 7.0}) == [
        "Modality 'MR' does not fully match 'CT'",
        "SliceThickness 7.0 is not <= 5",
    ]


def test_empty_matcher_matches_everything() -> None:
    assert matches({}, {})
    assert matches({}, {"Modality": "MR"})


def test_all_combinator() -> None:
    matcher = {"all": [{"Modality": "MR"}, {"SeriesDescription": ".*flair.*"}]}
    assert matches(matcher, {"Modality": "MR", "SeriesDescription": "Ax T2 FLAIR"})
    assert failures_of(matcher, {"Modality": "CT", "SeriesDescription": "Ax T2"}) == [
        "Modality 'CT' does not fully match 'MR'",
        "SeriesDescription 'Ax T2' does not fully match '.*flair.*'",
    ]


def test_any_combinator_reports_every_branch() -> None:
    matcher = {"any": [{"SeriesDescription": ".*adc.*"}, {"ImageType": "ADC"}]}
    assert matches(matcher, {"SeriesDescription": "dADC"})
    assert matches(matcher, {"SeriesDescription": "x", "ImageType": ["DERIVED", "PRIMARY", "ADC", "DIFFUSION"]})
    (reason,) = failures_of(matcher, {"SeriesDescription": "DWI", "ImageType": ["ORIGINAL", "PRIMARY"]})
    assert reason == (
        "none of the 'any' alternatives matched: "
        "(SeriesDescription 'DWI' does not fully match '.*adc.*') or "
        "(ImageType ['ORIGINAL','PRIMARY'] has no value matching 'ADC')"
    )


def test_not_combinator_says_what_matched() -> None:
    matcher = {"Modality": "MR", "not": {"SeriesDescription": ".*adc.*"}}
    assert matches(matcher, {"Modality": "MR", "SeriesDescription": "DWI"})
    assert failures_of(matcher, {"Modality": "MR", "SeriesDescription": "ep2d_diff_ADC"}) == [
        "excluded by 'not': SeriesDescription 'ep2d_diff_ADC' fully matches '.*adc.*'"
    ]
    # not of a missing attribute holds
    assert matches({"not": {"ContrastBolusAgent": True}}, {})


def test_nested_combinators() -> None:
    matcher = {
        "any": [
            {"all": [{"Modality": "CT"}, {"SliceThickness": "<= 5"}]},
            {
                "Modality": "MR",
                "not": {"any": [{"ImageType": "LOCALIZER"}, {"SeriesDescription": ".*scout.*"}]},
            },
        ]
    }
    assert matches(matcher, {"Modality": "CT", "SliceThickness": 1.0})
    assert matches(matcher, {"Modality": "MR", "SeriesDescription": "T1", "ImageType": ["ORIGINAL"]})
    assert not matches(matcher, {"Modality": "CT", "SliceThickness": 7.0})
    assert not matches(matcher, {"Modality": "MR", "SeriesDescription": "AAHead_Scout"})


def test_identifying_values_are_hidden_in_reasons() -> None:
    (reason,) = failures_of({"PatientName": "PHANTOM.*"}, {"PatientName": "DOE^JANE"})
    assert "DOE" not in reason and "<hidden>" in reason
    (reason,) = failures_of({"PatientID": "QA.*"}, {"PatientID": "12345678"})
    assert "12345678" not in reason


# -- compile errors ------------------------------------------------------------------------


def test_unknown_keyword_names_location_and_suggests() -> None:
    data = copy.deepcopy(CONFIG)
    data["routes"][2]["match"] = {"Modality": "CT", "SeriesDescriptoin": ".*venous.*"}
    with pytest.raises(RuleError) as info:
        settings_from_mapping(data)
    assert str(info.value) == (
        "routes[2].match.SeriesDescriptoin: unknown DICOM keyword (did you mean SeriesDescription?)"
    )
    assert isinstance(info.value, ConfigError)


@pytest.mark.parametrize(
    ("key", "hint"),
    [
        ("modality", "(did you mean Modality?)"),
        ("SliceThicknes", "(did you mean SliceThickness?)"),
        ("Any", "(did you mean any?)"),
    ],
)
def test_keyword_suggestions(key: str, hint: str) -> None:
    with pytest.raises(RuleError, match=re.escape(f"match.{key}: unknown DICOM keyword {hint}")):
        compile_matcher({key: "x"})


def test_unknown_keyword_without_close_match() -> None:
    with pytest.raises(RuleError) as info:
        compile_matcher({"Xyzzyqwv": "x"}, "routes[0].match")
    assert str(info.value) == "routes[0].match.Xyzzyqwv: unknown DICOM keyword"


def test_ae_title_inside_match_is_explained() -> None:
    with pytest.raises(RuleError, match="set calling_ae / called_ae on the route"):
        compile_matcher({"calling_ae": "PACS"})


def test_invalid_regex_in_pipeline_input_names_location() -> None:
    data = copy.deepcopy(CONFIG)
    data["pipelines"]["stroke"]["inputs"]["flair"]["match"] = {"SeriesDescription": "(flair"}
    with pytest.raises(RuleError) as info:
        settings_from_mapping(data)
    message = str(info.value)
    assert message.startswith(
        "pipelines.stroke.inputs.flair.match.SeriesDescription: invalid regular expression '(flair'"
    )
    assert "missing )" in message


@pytest.mark.parametrize(
    ("matcher", "expected"),
    [
        ({"any": [{"Modality": "MR"}, {"Modalty": "CT"}]}, "m.any[1].Modalty: unknown DICOM keyword"),
        (
            {"SeriesDescription": ["dwi", "[trace"]},
            "m.SeriesDescription[1]: invalid regular expression '[trace'",
        ),
        ({"SliceThickness": "<= thin"}, "m.SliceThickness: '<= thin' starts with a comparison operator"),
        ({"Modality": None}, "m.Modality: no condition given"),
        ({"Modality": {"regex": "MR"}}, "m.Modality: a condition is a pattern, a number, true/false"),
        ({"Modality": [["MR"]]}, "m.Modality[0]: lists of conditions cannot be nested"),
        ({"Modality": []}, "m.Modality: an empty list of conditions never matches"),
        ({"Modality": ""}, "m.Modality: an empty pattern never matches"),
        ({"all": {"Modality": "MR"}}, "m.all: expected a non-empty list of matchers"),
        ({"any": []}, "m.any: expected a non-empty list of matchers"),
        ({"not": {}}, "m.not: an empty matcher here matches everything"),
        ({"not": "MR"}, "m.not: expected a mapping of DICOM keywords"),
        (
            {"ReferencedSeriesSequence": True},
            "m.ReferencedSeriesSequence: ReferencedSeriesSequence is a sequence",
        ),
        ({"PixelData": True}, "m.PixelData: PixelData is binary data"),
        ({"TransferSyntaxUID": ".*"}, "m.TransferSyntaxUID: TransferSyntaxUID is a file meta"),
    ],
)
def test_bad_matchers(matcher: dict[str, Any], expected: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_matcher(matcher, "m")
    assert str(info.value).startswith(expected), str(info.value)


def test_every_problem_is_listed() -> None:
    data = copy.deepcopy(CONFIG)
    data["routes"][0]["match"] = {"Modalty": "MR", "SeriesDescription": "(dwi"}
    data["pipelines"]["dentate"]["inputs"]["qsm"]["match"] = {"ImageTyp": "QSM"}
    with pytest.raises(RuleError) as info:
        settings_from_mapping(data)
    message = str(info.value)
    assert message.startswith("3 problems in the routing rules:")
    assert "pipelines.dentate.inputs.qsm.match.ImageTyp: unknown DICOM keyword (did you mean ImageType?)" in message
    assert "routes[0].match.Modalty: unknown DICOM keyword (did you mean Modality?)" in message
    assert "routes[0].match.SeriesDescription: invalid regular expression '(dwi'" in message


def test_bad_ae_regex_is_reported_at_load() -> None:
    data = copy.deepcopy(CONFIG)
    data["routes"][0]["calling_ae"] = "MR[0-9"
    with pytest.raises(ConfigError, match=r"routes\[0\]\.calling_ae"):
        settings_from_mapping(data)


# -- regular expressions are bounded in time ----------------------------------------------------
# Python's re backtracks, holds the GIL and cannot be interrupted: one catastrophic pattern on one crafted
# header would stop the router (and every thread of the node) for minutes or forever.


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("(a+)+$", "could take too long"),
        ("(a|a)*b", "could take too long"),
        ("(dwi|trace)+", "could take too long"),
        ("(x+x+)+y", "could take too long"),
        (".*a.*a.*a.*a.*b", "could take too long"),
        (r"\w*\w*\w*\w*\w*\w*b", "could take too long"),
        ("(.*a){10}", "could take too long"),
        (r"(a)\1", "uses backreferences"),
        ("a" * (MAX_PATTERN_LENGTH + 1), f"rules take patterns of up to {MAX_PATTERN_LENGTH}"),
    ],
)
def test_catastrophic_patterns_are_refused_when_the_rules_load(pattern: str, why: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_matcher({"SeriesDescription": pattern}, "routes[0].match")
    assert str(info.value).startswith("routes[0].match.SeriesDescription: "), str(info.value)
    assert why in str(info.value)
    data = copy.deepcopy(CONFIG)
    data["routes"][0]["calling_ae"] = pattern
    with pytest.raises(ConfigError, match=r"routes\[0\]\.calling_ae: "):
        settings_from_mapping(data)


def test_patterns_that_are_allowed_answer_quickly_on_the_worst_values() -> None:
    """Patterns near the bound, and the defaults' most complex one, on values crafted to make a backtracking
    matcher try every split, at the longest length the attribute is matched at."""
    length = match_length("SeriesDescription")
    assert length == 64 and match_length("ImageComments") == 1024 and match_length("Modality") == 64
    patterns = [
        ".*(t2.*(fs|spair|spir|fat.?sat|stir)|(fs|spair|spir|stir).*t2).*",
        ".*a.*a.*b",
        "a*a*a*b",
        r"\w*\w*\w*b",
        "a{0,60}a{0,60}a{0,60}x",
        "(.*a|.*b|.*c)(.*a|.*b|.*c).*x",
        "(.*a){3}x",
    ]
    values = ["a" * length, "ab" * (length // 2), "t2" * (length // 2), "a" * (length - 1) + "\n"]
    for pattern in patterns:
        matcher = compile_matcher({"SeriesDescription": pattern})
        for value in values:
            start = time.perf_counter()
            matcher.evaluate({"SeriesDescription": value})
            took = time.perf_counter() - start
            assert took < 1.0, f"{pattern!r} on {value[:10]!r}...: {took:.2f} s"


def test_values_beyond_the_bound_fail_without_being_matched() -> None:
    matcher = compile_matcher({"SeriesDescription": ".*dwi.*", "ImageType": "TRACEW"})
    start = time.perf_counter()
    result = matcher.evaluate({"SeriesDescription": "dwi" + "a" * 10**6, "ImageType": ["X"] * 10**5 + ["TRACEW"]})
    assert time.perf_counter() - start < 0.5
    assert not result.matched
    assert result.failures == [
        "SeriesDescription has a value of 1000003 characters, longer than the 64 a pattern is tried on for it, "
        "so it does not match '.*dwi.*'",
        f"ImageType has 100001 values, more than the {MAX_MATCHED_VALUES} a pattern is tried on, "
        "so it does not match 'TRACEW'",
    ]
    # at the bound they are matched as always
    assert matcher.evaluate({"SeriesDescription": "dwi" + "a" * 61, "ImageType": ["X"] * 15 + ["TRACEW"]}).matched


# -- loop guard ---------------------------------------------------------------------------------


def test_node_manufacturer_constant() -> None:
    assert NODE_MANUFACTURER == "pacs-node"


@pytest.mark.parametrize(
    "name",
    [
        "localizer",
        "Localizer_32ch",
        "3-Plane Loc",
        "3Plane Loc SSFSE",
        "AAHead_Scout",
        "AAHead_Scout_32ch-head-coil",
        "Topogram 0.6 T20s",
        "SURVEY",
        "SmartSurvey",
        "Survey_SHC",
        "Scout",
        "Tri-Pilot",
        "Surview",
        "localiser haste",
    ],
)
def test_localizer_names(name: str) -> None:
    assert is_localizer_name(name)


@pytest.mark.parametrize(
    "name",
    ["Blocked", "Allocation", "t1_mprage_sag_p2_iso", "Local shim", "SCOUTING", "ep2d_diff_3scan_trace_p2"],
)
def test_not_localizer_names(name: str) -> None:
    assert not is_localizer_name(name)


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"Manufacturer": "PACS-NODE", "Modality": "MR"}, "produced by pacs-node"),
        ({"Manufacturer": "ACME", "SoftwareVersions": ["VE11C", "pacs-node 0.1.0"]}, "produced by pacs-node"),
        ({"Modality": "SEG"}, "non-image object (Modality SEG)"),
        ({"Modality": "sr"}, "non-image object (Modality SR)"),
        ({"Modality": "RTSTRUCT"}, "non-image object"),
        ({"Modality": "KO"}, "non-image object"),
        ({"Modality": "PR"}, "non-image object"),
        ({"Modality": "DOC"}, "non-image object"),
        ({"Modality": "CT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7.4"}, "Secondary Capture"),
        ({"Modality": "OT"}, "Modality OT"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.22"}, "structured report"),
        ({"Modality": "MR", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.481.3"}, "radiotherapy object"),
        (
            {"Modality": "CT", "ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]},
            "ImageType contains LOCALIZER",
        ),
        ({"Modality": "MR", "ProtocolName": "AAHead_Scout"}, "ProtocolName 'AAHead_Scout'"),
    ],
)
def test_loop_guard(header: dict[str, Any], reason: str) -> None:
    guard = loop_guard(header)
    assert guard is not None and reason in guard


def test_loop_guard_lets_ordinary_images_through() -> None:
    assert loop_guard({}) is None
    assert loop_guard({"Modality": "MR", "SeriesDescription": "DWI", "Manufacturer": "GE MEDICAL SYSTEMS"}) is None


# -- realistic series, routed as an administrator expects -------------------------------------------


def mr(vendor: str, description: str, image_type: list[str], **extra: Any) -> dict[str, Any]:
    manufacturer = {"siemens": "SIEMENS", "ge": "GE MEDICAL SYSTEMS", "philips": "Philips Medical Systems"}[vendor]
    sop = ENHANCED_MR if vendor == "philips" else MR_IMAGE
    return {
        "SOPClassUID": sop,
        "Modality": "MR",
        "Manufacturer": manufacturer,
        "SeriesDescription": description,
        "ProtocolName": description,
        "ImageType": image_type,
        "BodyPartExamined": "HEAD",
        **extra,
    }


def ct(description: str, thickness: float, *, image_type: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "SOPClassUID": CT_IMAGE,
        "Modality": "CT",
        "Manufacturer": "SIEMENS",
        "SeriesDescription": description,
        "SliceThickness": thickness,
        "BodyPartExamined": "ABDOMEN",
        "ImageType": image_type or ["ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI"],
        **extra,
    }


ORIG = ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"]

# (id, header, {route: roles}, guard substring or None)
SERIES: list[tuple[str, dict[str, Any], dict[str, list[str]], str | None]] = [
    # Siemens MR
    (
        "siemens-trace",
        mr("siemens", "ep2d_diff_3scan_trace_p2", ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW", "ND"]),
        {"stroke": ["dwi"]},
        None,
    ),
    (
        "siemens-adc",
        mr("siemens", "ep2d_diff_3scan_trace_p2_ADC", ["DERIVED", "PRIMARY", "ADC", "DIFFUSION"]),
        {"stroke": ["adc"]},
        None,
    ),
    ("siemens-flair", mr("siemens", "t2_tirm_tra_dark-fluid", ORIG), {"stroke": ["flair"]}, None),
    ("siemens-qsm", mr("siemens", "QSM", ["DERIVED", "PRIMARY", "QSM"]), {"dentate-research": ["qsm"]}, None),
    ("siemens-swi", mr("siemens", "SWI_Images", ["DERIVED", "PRIMARY", "SWI", "NORM", "DIS2D"]), {}, None),
    (
        "siemens-kidney-mr",
        mr("siemens", "t2_haste_fs_tra_mbh", ORIG, BodyPartExamined="ABDOMEN"),
        {"kidney-mr": ["image"]},
        None,
    ),
    ("siemens-t1-head", mr("siemens", "t1_mprage_sag_p2_iso", ORIG), {}, None),
    # GE MR
    ("ge-dwi", mr("ge", "DWI", ["ORIGINAL", "PRIMARY", "OTHER"]), {"stroke": ["dwi"]}, None),
    (
        "ge-adc",
        mr("ge", "Apparent Diffusion Coefficient (mm2/s)", ["DERIVED", "SECONDARY", "ADC"]),
        {"stroke": ["adc"]},
        None,
    ),
    ("ge-flair", mr("ge", "Ax T2 FLAIR", ["ORIGINAL", "PRIMARY", "OTHER"]), {"stroke": ["flair"]}, None),
    ("ge-swan", mr("ge", "SWAN", ["ORIGINAL", "PRIMARY", "OTHER"]), {}, None),
    # Philips MR
    (
        "philips-dwi",
        mr("philips", "DWI_SENSE", ["ORIGINAL", "PRIMARY", "DIFFUSION", "NONE"]),
        {"stroke": ["dwi"]},
        None,
    ),
    (
        "philips-adc",
        mr("philips", "dADC", ["DERIVED", "PRIMARY", "DIFFUSION", "ADC"]),
        {"stroke": ["adc"]},
        None,
    ),
    (
        "philips-flair",
        mr("philips", "sT2W_FLAIR", ["ORIGINAL", "PRIMARY", "FLAIR"]),
        {"stroke": ["flair"]},
        None,
    ),
    (
        "philips-qsm",
        mr("philips", "QSM_Philips", ["DERIVED", "PRIMARY", "PHASE"]),
        {"dentate-research": ["qsm"]},
        None,
    ),
    # CT
    ("ct-pv-siemens", ct("Abdomen 3.0 B30f PV", 3.0), {"kidney-ct": ["image"]}, None),
    (
        "ct-pv-ge",
        ct("PORTAL VENOUS 2.5mm", 2.5, Manufacturer="GE MEDICAL SYSTEMS"),
        {"kidney-ct": ["image"]},
        None,
    ),
    ("ct-venous-br40", ct("Venous Phase 1.5 Br40", 1.5), {"kidney-ct": ["image"]}, None),
    ("ct-venous-5mm-boundary", ct("Venous Phase 5.0 Br40", 5.0), {"kidney-ct": ["image"]}, None),
    ("ct-arterial", ct("Arterial Phase 1.5 Br40", 1.5), {}, None),
    ("ct-7mm", ct("Abdomen 7.0 B30f PV", 7.0), {}, None),
    # localizers
    ("siemens-localizer", mr("siemens", "localizer", ORIG), {}, "localizer"),
    ("ge-3plane-loc", mr("ge", "3-Plane Loc", ["ORIGINAL", "PRIMARY", "OTHER"]), {}, "localizer"),
    ("siemens-aahead-scout", mr("siemens", "AAHead_Scout", ORIG), {}, "localizer"),
    (
        "ct-topogram",
        ct("Topogram 0.6 T20s", 0.6, image_type=["ORIGINAL", "PRIMARY", "LOCALIZER", "CT_SOM5 TOP"]),
        {},
        "ImageType contains LOCALIZER",
    ),
    # never routed: screenshots, non-image objects, our own results
    (
        "ct-dose-report-sc",
        ct("Dose Report", 5.0, SOPClassUID=SECONDARY_CAPTURE, ImageType=["DERIVED", "SECONDARY", "OTHER"]),
        {},
        "Secondary Capture",
    ),
    (
        "pacs-node-seg",
        {
            "SOPClassUID": SEG_STORAGE,
            "Modality": "SEG",
            "Manufacturer": NODE_MANUFACTURER,
            "SeriesDescription": "Stroke lesion (pacs-node)",
        },
        {},
        "produced by pacs-node",
    ),
    (
        "pacs-node-sc",
        mr(
            "siemens",
            "DWI lesion overlay",
            ["DERIVED", "SECONDARY"],
            SOPClassUID=SECONDARY_CAPTURE,
            Manufacturer=NODE_MANUFACTURER,
        ),
        {},
        "produced by pacs-node",
    ),
]


@pytest.mark.parametrize(("header", "expected", "guard"), [s[1:] for s in SERIES], ids=[s[0] for s in SERIES])
def test_realistic_series_routing(
    rules: CompiledRules, header: dict[str, Any], expected: dict[str, list[str]], guard: str | None
) -> None:
    decision = rules.evaluate(header)
    if guard is None:
        assert decision.guard is None
    else:
        assert decision.guard is not None and guard in decision.guard
        assert decision.matches == [] and not decision.routed
    assert {m.route.name: m.roles for m in decision.matches} == expected
    assert decision.routed is bool(expected)
    if decision.guard is None:
        # every route is accounted for, misses nearest first
        assert len(decision.matches) + len(decision.misses) == len(CONFIG["routes"])
        counts = [len(m.failures) for m in decision.misses]
        assert counts == sorted(counts)
        assert all(m.failures for m in decision.misses)


def test_near_miss_reasons(rules: CompiledRules) -> None:
    decision = rules.evaluate(ct("Abdomen 7.0 B30f PV", 7.0))
    nearest = decision.misses[0]
    assert nearest.route.name == "kidney-ct"
    assert nearest.failures == ["SliceThickness 7.0 is not <= 5"]

    decision = rules.evaluate(ct("Arterial Phase 1.5 Br40", 1.5))
    nearest = decision.misses[0]
    assert nearest.route.name == "kidney-ct"
    (reason,) = nearest.failures
    assert reason.startswith("pipeline input 'image': none of the 'any' alternatives matched")
    assert "excluded by 'not': SeriesDescription 'Arterial Phase 1.5 Br40' fully matches '.*arterial.*'" in reason

    # SWI is not QSM: the dentate route is among the nearest misses, and says why
    decision = rules.evaluate(mr("siemens", "SWI_Images", ["DERIVED", "PRIMARY", "SWI"]))
    dentate = next(m for m in decision.misses[:2] if m.route.name == "dentate-research")
    assert dentate.failures == [
        "pipeline input 'qsm': none of the 'any' alternatives matched: "
        "(SeriesDescription 'SWI_Images' does not fully match '.*qsm.*') or "
        "(ImageType ['DERIVED','PRIMARY','SWI'] has no value matching 'QSM')"
    ]
    kidney_ct = next(m for m in decision.misses if m.route.name == "kidney-ct")
    assert kidney_ct.failures[-1] == "it also fills no input of pipeline 'kidney' (image)"
    assert r"'.*\bpv\b.*'" not in str(decision.misses)  # patterns shown as written


def test_calling_ae_conditions(rules: CompiledRules) -> None:
    dwi = mr("ge", "DWI", ["ORIGINAL", "PRIMARY", "OTHER"])
    unknown = rules.evaluate(dwi)
    (match,) = unknown.matches
    assert match.notes == [r"calling AE not checked (unknown here); the route requires 'MR\d*|PACS'"]

    assert [m.route.name for m in rules.evaluate(dwi, calling_ae="mr2").matches] == ["stroke"]
    assert [m.route.name for m in rules.evaluate(dwi, calling_ae="PACS ").matches] == ["stroke"]
    refused = rules.evaluate(dwi, calling_ae="CT01")
    assert refused.matches == []
    stroke = next(m for m in refused.misses if m.route.name == "stroke")
    assert stroke.failures == [r"calling AE 'CT01' does not fully match 'MR\d*|PACS'"]


def test_called_ae_condition() -> None:
    data = copy.deepcopy(CONFIG)
    data["routes"][1]["called_ae"] = "PACSNODE_RES"
    compiled = compile_settings(settings_from_mapping(data))
    qsm = mr("siemens", "QSM", ["DERIVED", "PRIMARY", "QSM"])
    assert compiled.evaluate(qsm, called_ae="pacsnode_res").routed
    miss = next(m for m in compiled.evaluate(qsm, called_ae="PACSNODE").misses if m.route.name == "dentate-research")
    assert miss.failures == ["called AE 'PACSNODE' does not fully match 'PACSNODE_RES'"]


def test_role_matches(rules: CompiledRules) -> None:
    assert rules.role_matches("stroke", mr("siemens", "ep2d_diff_3scan_trace_p2", ["DERIVED", "TRACEW"])) == ["dwi"]
    assert rules.role_matches("stroke", mr("ge", "Ax T2 FLAIR", ["ORIGINAL"])) == ["flair"]
    assert rules.role_matches("stroke", {"Modality": "CT"}) == []
    with pytest.raises(RuleError, match="unknown pipeline 'nope'"):
        rules.role_matches("nope", {})


def test_default_input_matches_everything() -> None:
    data = {
        "pipelines": {"demo": {"model": "models/demo"}},
        "routes": [{"name": "all-ct", "pipeline": "demo", "match": {"Modality": "CT"}}],
    }
    compiled = compile_settings(settings_from_mapping(data))
    assert compiled.role_matches("demo", {}) == ["image"]
    (match,) = compiled.evaluate({"Modality": "CT"}).matches
    assert match.roles == ["image"]
    assert compiled.evaluate({"Modality": "MR"}).misses[0].failures == ["Modality 'MR' does not fully match 'CT'"]


def test_route_with_match_still_needs_an_input_role(rules: CompiledRules) -> None:
    # kidney-mr's own match holds for any abdominal MR, but a T1 fills no kidney input
    decision = rules.evaluate(mr("siemens", "t1_vibe_fs_tra", ORIG, BodyPartExamined="ABDOMEN"))
    assert decision.matches == []
    miss = next(m for m in decision.misses if m.route.name == "kidney-mr")
    assert miss.failures == [
        "pipeline input 'image': none of the 'any' alternatives matched: "
        "(Modality 'MR' does not fully match 'CT'; SeriesDescription 't1_vibe_fs_tra' matches none of "
        r"'.*\bpv\b.*', '.*portal.*', '.*venous.*', '.*nephro.*') or "
        "(SeriesDescription 't1_vibe_fs_tra' does not fully match '.*t2.*(fs|spair|spir|fat.?sat).*')"
    ]


# -- header summaries ---------------------------------------------------------------------------------


def make_dataset(**attrs: Any) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = attrs.pop("SOPClassUID", MR_IMAGE)
    ds.SOPInstanceUID = attrs.pop("SOPInstanceUID", generate_uid())
    ds.PatientName = attrs.pop("PatientName", "DOE^JANE")
    ds.PatientID = attrs.pop("PatientID", "PID-778899")
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write_instance(path: Path, ds: Dataset, *, preamble: bool = True) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    if preamble:
        ds.save_as(path, enforce_file_format=True)
    else:
        del ds.file_meta
        ds.save_as(path, implicit_vr=False, little_endian=True)
    return path


def test_header_from_dataset_types_and_skips() -> None:
    ds = make_dataset(
        Modality="MR",
        SeriesDescription="ep2d_diff_3scan_trace_p2",
        ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"],
        SeriesNumber=5,
        SliceThickness="5.0",
        PixelSpacing=[0.9, 0.9],
        Rows=256,
        EchoTime=89.0,
        ImageComments="x" * 300,  # LT: truncated
        TextValue="short UT",
        ReferencedSeriesSequence=Sequence([Dataset()]),
        PixelData=b"\x00\x01" * 8,
    )
    ds.add_new(0x0018_9089, "FD", [0.0, 0.0, 1.0])  # DiffusionGradientOrientation
    ds.add_new(0x0040_A160, "UT", "y" * 300)  # TextValue replaced by a long UT: skipped
    ds.add_new(0x0019_0010, "LO", "SIEMENS MR HEADER")  # private creator
    ds.add_new(0x0019_100C, "IS", "1000")  # private b-value
    header = header_from_dataset(ds)
    json.dumps(header)
    assert header["Modality"] == "MR"
    assert header["PatientName"] == "DOE^JANE"
    assert header["ImageType"] == ["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"]
    assert header["SeriesNumber"] == 5 and isinstance(header["SeriesNumber"], int)
    assert header["SliceThickness"] == 5.0 and type(header["SliceThickness"]) is float
    assert header["PixelSpacing"] == [0.9, 0.9]
    assert header["Rows"] == 256
    assert header["EchoTime"] == 89.0
    assert header["DiffusionGradientOrientation"] == [0.0, 0.0, 1.0]
    assert header["ImageComments"] == "x" * 256
    for absent in ("TextValue", "ReferencedSeriesSequence", "PixelData"):
        assert absent not in header
    assert all(not k.startswith("Private") for k in header) and len(header) == 14


def test_header_skips_malformed_values_without_raising() -> None:
    ds = make_dataset(Modality="MR")
    ds[0x0020_0011] = RawDataElement(Tag(0x0020_0011), "IS", 3, b"abc", 0, False, True)
    ds[0x0018_0050] = RawDataElement(Tag(0x0018_0050), "DS", 4, b"thin", 0, False, True)
    ds[0x0028_0010] = RawDataElement(Tag(0x0028_0010), "US", 3, b"\x01\x02\x03", 0, False, True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom may warn about the bad values; we must not raise
        header = header_from_dataset(ds)
    assert header["Modality"] == "MR"
    assert "SeriesNumber" not in header and "SliceThickness" not in header


def test_header_from_file(tmp_path: Path) -> None:
    ds = make_dataset(Modality="CT", SeriesDescription="Abdomen 3.0 B30f PV", BitsAllocated=8, PixelData=b"\x00" * 8)
    path = write_instance(tmp_path / "ct.dcm", ds)
    header = header_from_file(path)
    assert header["SeriesDescription"] == "Abdomen 3.0 B30f PV"
    assert "PixelData" not in header and "TransferSyntaxUID" not in header


def test_header_from_file_without_preamble(tmp_path: Path) -> None:
    path = write_instance(tmp_path / "raw.dcm", make_dataset(Modality="MR"), preamble=False)
    assert pydicom.dcmread(path, force=True).Modality == "MR"
    assert header_from_file(path)["Modality"] == "MR"


def test_header_from_file_errors(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("not a dicom file\n" * 20)
    with pytest.raises(NotDicomError, match=r"notes\.txt: not a DICOM file"):
        header_from_file(text)
    with pytest.raises(HeaderError, match="cannot read file"):
        header_from_file(tmp_path / "missing.dcm")


# -- the administrator's tester ----------------------------------------------------------------------------


def test_rules_report(tmp_path: Path, settings: Settings) -> None:
    dwi_uid, ct_uid = generate_uid(), generate_uid()
    for i in range(2):
        ds = make_dataset(
            Modality="MR",
            Manufacturer="SIEMENS",
            SeriesInstanceUID=dwi_uid,
            SeriesNumber=7,
            SeriesDescription="ep2d_diff_3scan_trace_p2",
            ImageType=["DERIVED", "PRIMARY", "DIFFUSION", "TRACEW"],
            InstanceNumber=i + 1,
        )
        write_instance(tmp_path / "study" / "dwi" / f"IM{i}", ds)
    ds = make_dataset(
        SOPClassUID=CT_IMAGE,
        Modality="CT",
        SeriesInstanceUID=ct_uid,
        SeriesNumber=3,
        SeriesDescription="Abdomen 7.0 B30f PV",
        SliceThickness="7.0",
        BodyPartExamined="ABDOMEN",
    )
    write_instance(tmp_path / "study" / "ct" / "IM0", ds)
    (tmp_path / "study" / "README.txt").write_text("exported from PACS\n")

    text, code = rules_report(settings, [tmp_path / "study"])
    assert code == 0
    assert "2 series found" in text
    assert "ROUTED by route 'stroke' to pipeline 'stroke'" in text
    assert "as input dwi (required)" in text
    assert "priority stat; results go to: pacs, viewer" in text
    assert "calling AE not checked" in text
    assert "MR (SIEMENS), series 7 'ep2d_diff_3scan_trace_p2', 2 files" in text
    assert "CT, series 3 'Abdomen 7.0 B30f PV', 1 file" in text
    assert "NOT ROUTED: no route matches this series" in text
    assert "route 'kidney-ct' (pipeline 'kidney'):\n      - SliceThickness 7.0 is not <= 5\n" in text
    assert "README.txt: not DICOM, skipped" in text
    assert "Summary: 1 series routed, 0 never routed (loop guard), 1 matched no route." in text
    # series ordered by number: CT (3) before MR (7)
    assert text.index("series 3") < text.index("series 7")
    for identifying in ("DOE", "JANE", "PID-778899"):
        assert identifying not in text


def test_rules_report_guard_and_no_dicom(tmp_path: Path, settings: Settings) -> None:
    ds = make_dataset(Modality="MR", SeriesInstanceUID=generate_uid(), SeriesDescription="AAHead_Scout")
    single = write_instance(tmp_path / "scout.dcm", ds)
    text, code = rules_report(settings, [single])
    assert code == 0
    assert "NEVER ROUTED: localizer/scout (SeriesDescription 'AAHead_Scout')" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("hello")
    text, code = rules_report(settings, [empty, tmp_path / "nowhere"])
    assert code == 2
    assert "No DICOM files found" in text
    assert "nowhere: not found" in text
