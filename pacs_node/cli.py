"""The ``pacs-node`` command line.

Only :func:`main` configures logging and loads settings; every command gets the
one :class:`~pacs_node.config.Settings` object passed down.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pacs_node import __version__
from pacs_node.config import Settings, load_settings
from pacs_node.errors import PacsNodeError
from storage.db import Database
from storage.errors import StorageError

logger = logging.getLogger(__name__)


def configure_logging(level: str) -> None:
    """Log to stderr with timestamps; pynetdicom's chatter stays at WARNING."""
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    if level != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        logging.getLogger("alembic").setLevel(logging.WARNING)


def _dicom_files(paths: Sequence[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            out.extend(str(f) for f in sorted(path.rglob("*")) if f.is_file())
        elif path.is_file():
            out.append(str(path))
        else:
            raise PacsNodeError(f"{p}: no such file or folder")
    return out


@contextlib.contextmanager
def _database(settings: Settings) -> Iterator[Database]:
    """The node's database, migrated to the latest schema, disposed afterwards."""
    db = Database(settings.db_url)
    try:
        db.upgrade()
        yield db
    finally:
        db.dispose()


def cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.service import serve

    return serve(settings)


def cmd_echo(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.scp import echo

    status = echo(args.host, args.port, calling_ae=args.aet or settings.dicom.ae_title, called_ae=args.aec)
    print(
        f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X} ({'success' if status == 0 else 'failure'})"
    )
    return 0 if status == 0 else 1


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from pydicom.errors import InvalidDicomError

    from pacs_node.scp import send_files

    files = []
    for f in _dicom_files(args.paths):
        try:
            from pydicom import dcmread

            dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            files.append(f)
        except (InvalidDicomError, OSError):
            print(f"skipping {f}: not a DICOM file", file=sys.stderr)
    if not files:
        print("no DICOM files to send", file=sys.stderr)
        return 2
    results = send_files(
        args.host, args.port, files, calling_ae=args.aet or settings.dicom.ae_title, called_ae=args.aec
    )
    failed = {uid: st for uid, st in results.items() if st not in (0x0000, 0xB000, 0xB007, 0xB006)}
    print(f"sent {len(results)} instances to {args.aec}@{args.host}:{args.port}: {len(results) - len(failed)} stored")
    for uid, st in failed.items():
        print(f"  {uid}: status 0x{st:04X}" if st >= 0 else f"  {uid}: no response")
    return 0 if not failed else 1


def cmd_rules_test(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.rules import rules_report

    text, code = rules_report(settings, [Path(p) for p in args.paths])
    print(text)
    return code


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as db:
        print(f"database at {db.engine.url.render_as_string(hide_password=True)} is at the latest schema")
    return 0


def cmd_studies_list(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from storage.models import Job, Study

    with _database(settings) as db, db.session() as session:
        studies = session.scalars(select(Study).order_by(Study.id.desc()).limit(args.limit)).all()
        if not studies:
            print("no studies received yet")
            return 0
        print(f"{'id':>5}  {'study date':10}  {'series':>6}  {'instances':>9}  {'jobs':14}  study instance UID")
        for st in studies:
            n_inst = sum(s.instance_count for s in st.series)
            jobs = session.scalars(select(Job).where(Job.study_id == st.id)).all()
            states: dict[str, int] = {}
            for j in jobs:
                states[j.state.value] = states.get(j.state.value, 0) + 1
            job_txt = ",".join(f"{k.lower()}:{v}" for k, v in sorted(states.items())) or "-"
            print(
                f"{st.id:>5}  {st.study_date or '-':10}  {len(st.series):>6}  {n_inst:>9}  {job_txt:14}  {st.study_uid}"
            )
            if args.series:
                for s in st.series:
                    print(
                        f"         series {s.series_number if s.series_number is not None else '-':>4} "
                        f"{(s.modality or '?'):3} {s.instance_count:>5} inst  {s.state.value:9} "
                        f"{(s.series_description or '')[:40]:40}  {s.route_note or ''}"
                    )
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from storage.models import Job, JobState

    with _database(settings) as db, db.session() as session:
        q = select(Job).order_by(Job.id.desc()).limit(args.limit)
        if args.state:
            q = q.where(Job.state == JobState(args.state.upper()))
        jobs = session.scalars(q).all()
        if not jobs:
            print("no jobs")
            return 0
        print(
            f"{'id':>5}  {'state':9}  {'prio':6}  {'pipeline':12}  {'created (UTC)':19}  {'secs':>6}  reason / result"
        )
        for j in jobs:
            secs = (j.timings or {}).get("total")
            note = j.reason or (
                ", ".join(f"{v['name']} {v['volume_ml']:.1f} mL" for v in (j.metrics or {}).get("labels", {}).values())
                if j.metrics
                else ""
            )
            print(
                f"{j.id:>5}  {j.state.value:9}  {j.priority:6}  {j.pipeline[:12]:12}  "
                f"{j.created_at:%Y-%m-%d %H:%M:%S}  {secs if secs is not None else '-':>6}  {note[:90]}"
            )
    return 0


def cmd_jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from storage.models import Job

    with _database(settings) as db, db.session() as session:
        job = session.get(Job, args.id)
        if job is None:
            print(f"no job {args.id}", file=sys.stderr)
            return 1
        fields = {
            "id": job.id,
            "state": job.state.value,
            "pipeline": job.pipeline,
            "route": job.route,
            "priority": job.priority,
            "study": job.study.study_uid,
            "inputs": job.inputs,
            "destinations": job.destinations,
            "reason": job.reason,
            "created_at": job.created_at.isoformat(),
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "attempts": job.attempts,
            "worker": job.worker_id,
            "model": {"name": job.model_name, "version": job.model_version, "sha256": job.model_checksums},
            "timings_s": job.timings,
            "metrics": job.metrics,
            "result": job.result_path,
        }
        print(json.dumps(fields, indent=2, ensure_ascii=False))
    return 0


def cmd_jobs_rerun(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.jobs import rerun

    with _database(settings) as db:
        lines = rerun(db, study_uid=args.study, series_uid=args.series)
        for line in lines:
            print(line)
    return 0 if lines else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    config_help = "YAML settings file (default: embedded defaults, or PACS_NODE_CONFIG)"
    # --config may stand before or after the command; the subcommands' copy must
    # not overwrite a value given before the command with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", "-c", default=argparse.SUPPRESS, help=config_help)
    parser = argparse.ArgumentParser(prog="pacs-node", description="DICOM AI node beside a PACS")
    parser.add_argument("--config", "-c", default=None, help=config_help)
    parser.add_argument("--version", action="version", version=f"pacs-node {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", parents=[common], help="run the node: DICOM SCP, router, workers")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("echo", parents=[common], help="C-ECHO a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--aet", help="calling AE title (default: dicom.ae_title)")
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (default: ANY-SCP)")
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", parents=[common], help="C-STORE files or folders to a DICOM peer")
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--aet", help="calling AE title (default: dicom.ae_title)")
    p.add_argument("--aec", default="ANY-SCP", help="called AE title (default: ANY-SCP)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("rules", parents=[common], help="routing rules")
    rsub = p.add_subparsers(dest="rules_command", required=True, metavar="SUBCOMMAND")
    q = rsub.add_parser("test", parents=[common], help="which rule matches each series in PATH, and near misses")
    q.add_argument("paths", nargs="+", metavar="PATH")
    q.set_defaults(func=cmd_rules_test)

    p = sub.add_parser("db", parents=[common], help="database maintenance")
    dsub = p.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("upgrade", parents=[common], help="apply database migrations")
    q.set_defaults(func=cmd_db_upgrade)

    p = sub.add_parser("studies", parents=[common], help="studies on the node")
    ssub = p.add_subparsers(dest="studies_command", required=True, metavar="SUBCOMMAND")
    q = ssub.add_parser("list", parents=[common], help="list recent studies")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--series", action="store_true", help="show each series with its routing state")
    q.set_defaults(func=cmd_studies_list)

    p = sub.add_parser("jobs", parents=[common], help="segmentation jobs")
    jsub = p.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    q = jsub.add_parser("list", parents=[common], help="list recent jobs")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--state", choices=["waiting", "pending", "running", "done", "failed", "cancelled"])
    q.set_defaults(func=cmd_jobs_list)
    q = jsub.add_parser("show", parents=[common], help="one job in full (JSON)")
    q.add_argument("id", type=int)
    q.set_defaults(func=cmd_jobs_show)
    q = jsub.add_parser("rerun", parents=[common], help="re-process a study or a series")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--study", metavar="UID")
    g.add_argument("--series", metavar="UID")
    q.set_defaults(func=cmd_jobs_rerun)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``pacs-node`` console script."""
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings(args.config)
    except PacsNodeError as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level)
    try:
        return int(args.func(settings, args))
    except (PacsNodeError, StorageError, ConnectionError) as exc:
        print(f"pacs-node: {exc}", file=sys.stderr)
        return 1
