"""Plain SCU tools: C-ECHO a peer, C-STORE files over one association.

Used by ``pacs-node echo`` / ``pacs-node send``, the demo, and tests; the
dispatcher's own sender (with status classification and retries) is
:mod:`pacs_node.deliver.dimse`.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydicom import dcmread
from pynetdicom import AE

from pacs_node.common.dicomnet import VERIFICATION, nodelay
from pacs_node.common.dul import install as install_transport


def echo(host: str, port: int, *, calling_ae: str = "PACSNODE", called_ae: str = "ANY-SCP", timeout: float = 10) -> int:
    """C-ECHO a peer; returns the status (0 is success).

    Raises:
        ConnectionError: no association could be established.
    """
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae} at {host}:{port} (rejected, aborted or unreachable)")
    nodelay(assoc.dul.socket.socket if assoc.dul.socket else None)
    try:
        status = assoc.send_c_echo()
        return int(status.Status) if status else -1
    finally:
        assoc.release()


def send_files(
    host: str,
    port: int,
    paths: Sequence[str],
    *,
    calling_ae: str = "PACSNODE",
    called_ae: str = "ANY-SCP",
    timeout: float = 30,
) -> dict[str, int]:
    """C-STORE files to a peer over one association; returns SOP Instance UID -> status.

    Presentation contexts are proposed for the SOP class and transfer syntax
    of each file as it is (no transcoding).

    Raises:
        ConnectionError: no association could be established.
    """
    pairs: dict[tuple[str, str], None] = {}
    headers = []
    for p in paths:
        ds = dcmread(p, stop_before_pixels=True)
        key = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        pairs[key] = None
        headers.append((p, str(ds.SOPInstanceUID)))
    if len(pairs) > 128:
        raise ValueError("more than 128 SOP class / transfer syntax pairs; send in smaller groups")
    install_transport()  # among others, a reactor pause that holds between consecutive C-STOREs
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, ts in pairs:
        ae.add_requested_context(sop_class, ts)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae} at {host}:{port} (rejected, aborted or unreachable)")
    nodelay(assoc.dul.socket.socket if assoc.dul.socket else None)
    results: dict[str, int] = {}
    try:
        for path, sop in headers:
            status = assoc.send_c_store(path)
            results[sop] = int(status.Status) if status else -1
    finally:
        if assoc.is_established:
            assoc.release()
    return results
