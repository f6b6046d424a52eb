"""A DICOM conformance statement generated from the running configuration.

:func:`conformance_statement` returns Markdown: what the node accepts (SOP
classes and transfer syntaxes of the Storage SCP, taken from the same lists
the SCP is built from), what it produces and sends, its AE title, ports,
access control, TLS status and DICOMweb services (each destination as its
sender in :mod:`pacs_node.deliver.senders` describes it). It reads nothing but the
settings and the code, so ``pacs-node conformance`` and the HTTP server's
``/conformance`` print the same text for the same configuration.
"""

from __future__ import annotations

from pydicom.uid import UID

from pacs_node import __version__
from pacs_node.common.dicomnet import VERIFICATION
from pacs_node.config import DicomwebDestination, Settings
from pacs_node.deliver.senders import sender_for
from pacs_node.receive.scp import TRANSFER_SYNTAXES, storage_sop_classes

#: Objects the node produces: (SOP class UID, what it is, when).
PRODUCED: tuple[tuple[str, str, str], ...] = (
    ("1.2.840.10008.5.1.4.1.1.66.4", "Segmentation Storage (BINARY)", "every finished job"),
    (
        "1.2.840.10008.5.1.4.1.1.66.7",
        "Label Map Segmentation Storage",
        "jobs whose destinations set seg_type: labelmap",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.88.34",
        "Comprehensive 3D SR Storage (TID 1500 measurement report)",
        "every finished job",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.7",
        "Secondary Capture Image Storage (key image, overlay burned in)",
        "outputs.key_image",
    ),
    (
        "1.2.840.10008.5.1.4.1.1.88.33",
        "Comprehensive SR Storage (not-processed notice)",
        "routes with not_processed_notice, when a job fails for its input",
    ),
)

_NAMES = {
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation Storage",
    "1.2.840.10008.1.2.4.201": "High-Throughput JPEG 2000 Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.202": "High-Throughput JPEG 2000 with RPCL Options Image Compression (Lossless Only)",
    "1.2.840.10008.1.2.4.203": "High-Throughput JPEG 2000 Image Compression",
}


def uid_name(uid: str) -> str:
    """The name of a UID from the DICOM dictionary (the UID itself when unknown)."""
    if uid in _NAMES:
        return _NAMES[uid]
    name = UID(uid).name
    # pydicom answers with the UID itself for UIDs it does not know; some entries
    # of pydicom 3.0's table are shifted for the newest UIDs, hence _NAMES.
    return name if name and name != uid else uid


def _tls_line(settings: Settings) -> str:
    tls = settings.dicom.tls
    if tls is None:
        return "not configured (plain TCP); set dicom.tls, or protect the port with network controls"
    if tls.require_client_cert:
        clients = "client certificates required, verified against dicom.tls.ca_file"
    elif tls.ca_file is not None:
        clients = "client certificates optional, verified against dicom.tls.ca_file when presented"
    else:
        clients = "client certificates not checked"
    return f"DICOM TLS only on this port (TLS 1.2 or later); {clients}"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out.extend("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows)
    return out


def insecure_destinations(settings: Settings) -> list[str]:
    """Names of the DICOMweb destinations whose password or token goes over plain HTTP to another machine."""
    return sorted(
        name
        for name, dest in settings.destinations.items()
        if isinstance(dest, DicomwebDestination) and dest.secret_in_clear
    )


def conformance_statement(settings: Settings, *, http_url: str | None = None) -> str:
    """The conformance statement of a node running with ``settings``, as Markdown.

    Args:
        settings: the node's settings.
        http_url: the base URL the HTTP server is reached at (default:
            ``http.public_url``, else ``http://{http.host}:{http.port}``).
    """
    d = settings.dicom
    h = settings.http
    base = (http_url or h.public_url or f"http://{h.host}:{h.port}").rstrip("/")
    token = h.token_file is not None or h.token_env is not None
    lines: list[str] = [
        f"# DICOM Conformance Statement: pacs-node {__version__}",
        "",
        "Generated from the running configuration. pacs-node receives studies from a PACS (C-STORE or STOW-RS), "
        "runs segmentation pipelines on them and sends the results (SEG, TID 1500 SR, key image) back.",
        "",
        "## 1. Network services",
        "",
    ]
    lines += _table(
        ("Service", "Role", "Details"),
        [
            ("Verification (C-ECHO)", "SCP", f"AE {d.ae_title} on port {d.port}"),
            ("Storage (C-STORE)", "SCP", f"AE {d.ae_title} on port {d.port}; {len(storage_sop_classes())} SOP classes"),
            ("Storage (C-STORE)", "SCU", "results sent to the DIMSE destinations below"),
            (
                "DICOMweb STOW-RS, QIDO-RS, WADO-RS",
                "origin server",
                f"{base}/dicom-web" if h.enabled else "disabled (http.enabled: false)",
            ),
            ("DICOMweb STOW-RS", "user agent", "results sent to the DICOMweb destinations below"),
        ],
    )
    lines += [
        "",
        "## 2. DIMSE Application Entity",
        "",
        f"- AE title: `{d.ae_title}` (called AE title {'checked' if d.require_called_ae else 'not checked'})",
        f"- Listens on {d.host}:{d.port}, up to {d.max_associations} concurrent associations"
        + (f" in {d.processes} processes" if d.processes > 1 else ""),
        f"- Maximum PDU size received: {d.max_pdu_size} bytes (longer PDUs abort the association)",
        f"- Timeouts: ACSE {d.acse_timeout_s:g} s, DIMSE {d.dimse_timeout_s:g} s, network {d.network_timeout_s:g} s",
        "- Calling AE titles allowed: "
        + (", ".join(f"`{ae}`" for ae in d.allowed_calling_aes) if d.allowed_calling_aes else "any"),
        "- Source addresses allowed: " + (", ".join(d.allowed_hosts) if d.allowed_hosts else "any"),
        "- TLS: " + _tls_line(settings),
        "- Implementation: pynetdicom 3.0 (Implementation Class UID and Version Name of pynetdicom)",
        "",
        "### 2.1 Verification SCP",
        "",
    ]
    lines += _table(
        ("SOP Class", "UID", "Transfer Syntaxes"),
        [(uid_name(VERIFICATION), VERIFICATION, "Explicit VR Little Endian, Implicit VR Little Endian")],
    )
    lines += [
        "",
        "### 2.2 Storage SCP",
        "",
        "An instance is acknowledged (status 0000) only after its bytes are written, fsynced and renamed into the "
        "store's journal; it is then indexed and routed. Failure statuses: A700 (out of resources: disk full or below "
        f"storage.min_free_mb = {settings.storage.min_free_mb} MiB), C210 (cannot understand: unreadable header or "
        "missing/invalid Study, Series, SOP Instance or SOP Class UID). Instances are stored as received: no "
        "coercion, no transcoding. A re-sent SOP Instance UID replaces the earlier copy.",
        "",
        "Transfer syntaxes accepted for every storage SOP class, in order of preference:",
        "",
    ]
    lines += _table(("Transfer Syntax", "UID"), [(uid_name(ts), ts) for ts in TRANSFER_SYNTAXES])
    lines += ["", "Storage SOP classes accepted:", ""]
    lines += _table(("SOP Class", "UID"), [(uid_name(uid), uid) for uid in storage_sop_classes()])
    lines += [
        "",
        "## 3. Objects produced and sent",
        "",
        "Results join the source study (same Patient and Study attributes, new series with Manufacturer "
        "`pacs-node`), are encoded in Explicit VR Little Endian, and carry UIDs derived from their inputs and model "
        "version, so that re-processing the same input replaces rather than duplicates.",
        "",
    ]
    lines += _table(("SOP Class", "UID", "When"), [(name, uid, when) for uid, name, when in PRODUCED])
    lines += ["", "Destinations configured:", ""]
    dest_rows: list[tuple[str, ...]] = []
    for name, dest in sorted(settings.destinations.items()):
        protocol, peer = sender_for(dest).describe(dest)
        dest_rows.append((name, protocol, peer, dest.seg_type))
    lines += _table(("Name", "Protocol", "Peer", "SEG type"), dest_rows) if dest_rows else ["none"]
    insecure = insecure_destinations(settings)
    if insecure:
        lines += [
            "",
            "**Warning:** credentials go over plain HTTP (allow_insecure: true) to: " + ", ".join(insecure) + ".",
        ]
    senders = [r.name for r in settings.routes if r.return_to_sender is not None]
    if senders:
        lines += ["", "Routes that also return results to the sending AE (C-STORE): " + ", ".join(senders)]
    lines += ["", "## 4. DICOMweb", ""]
    if not h.enabled:
        lines += ["The HTTP server is disabled (http.enabled: false)."]
    else:
        root = f"{base}/dicom-web"
        lines += [
            f"Base URL: `{root}`. Bound to {h.host}:{h.port}; TLS is not terminated by the node"
            + (" (public URL uses https: a proxy terminates TLS)." if base.startswith("https://") else "."),
            "",
        ]
        lines += _table(
            ("Service", "Resources", "Media types"),
            [
                (
                    "STOW-RS",
                    "POST /studies, /studies/{study}",
                    'request multipart/related; type="application/dicom"; response application/dicom+json '
                    "(200 all stored, 202 some, 409 none; FailureReason C000 not application/dicom, "
                    "C210 not a DICOM file or unreadable, C409 other study, A700 out of resources)",
                ),
                (
                    "QIDO-RS",
                    "GET /studies, /series, /instances, /studies/{study}/series, "
                    "/studies/{study}/instances, /studies/{study}/series/{series}/instances",
                    "application/dicom+json; keys PatientName (wildcards), PatientID, AccessionNumber, "
                    "StudyDescription, StudyDate (ranges), StudyInstanceUID, ModalitiesInStudy, Modality, "
                    "SeriesInstanceUID, SOPInstanceUID, SOPClassUID; limit, offset, includefield, fuzzymatching",
                ),
                (
                    "WADO-RS",
                    "GET /studies/{study}[/series/{series}[/instances/{instance}]]",
                    'multipart/related; type="application/dicom" (stored bytes with transfer-syntax=*, '
                    "Explicit VR Little Endian by default, decompressed when needed)",
                ),
                (
                    "WADO-RS",
                    ".../metadata",
                    "application/dicom+json; pixel data and large binary values as BulkDataURI",
                ),
                (
                    "WADO-RS",
                    ".../instances/{instance}/frames/{list}, .../bulk/{tag}",
                    'multipart/related; type="application/octet-stream" (native little endian, or the '
                    "stored compressed frames with transfer-syntax=* or their image/* type)",
                ),
            ],
        )
        lines += [
            "",
            "Search and retrieval cover received instances and the node's own current results.",
        ]
    lines += [
        "",
        "## 5. Security",
        "",
        (
            "- HTTP: every request but /healthz needs `Authorization: Bearer <token>` (the token comes from "
            + ("http.token_file" if h.token_file is not None else "http.token_env")
            + ")."
        )
        if token
        else (
            "- HTTP: no bearer token configured; "
            + (
                "serving a non-loopback address without a token (http.allow_remote_without_token): an "
                "authenticating proxy must stand in front."
                if h.allow_remote_without_token
                else "the server binds only to loopback addresses and answers only requests for local host names."
            )
        ),
        "- Cross-origin requests (CORS) are allowed "
        + ("from any origin (bearer token required)." if token else "from loopback origins only."),
        "- DIMSE: access is limited by calling AE title and source address as listed in section 2.",
        "- DICOMweb destinations: a password or token is sent only over https:// or to this machine"
        + (
            f", except to {', '.join(insecure)} (allow_insecure: true)."
            if insecure
            else " (an http:// destination with credentials needs allow_insecure: true)."
        ),
        "",
        "## 6. Character sets",
        "",
        "All Specific Character Sets that pydicom decodes are accepted and stored unchanged; DICOM JSON answers are "
        "UTF-8.",
        "",
    ]
    return "\n".join(lines)
