"""The ``pacs-node`` command line.

Only :func:`main` configures logging and loads settings; every command gets the
one :class:`~pacs_node.config.Settings` object passed down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from pacs_node import __version__, query
from pacs_node.common.logs import configure_logging
from pacs_node.config import Settings, load_settings
from pacs_node.config.defaults import models_dir
from pacs_node.deliver.ledger import cancel_delivery, retry_delivery
from pacs_node.deliver.scu import echo, send_files
from pacs_node.errors import PacsNodeError
from pacs_node.process.jobs import rerun
from pacs_node.route.tester import rules_report
from pacs_node.web.conformance import conformance_statement
from storage.db import Database
from storage.errors import StorageError

logger = logging.getLogger(__name__)


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
    from pacs_node.app.service import serve

    return serve(settings)


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.process.celery_app import run_worker

    groups = [g.strip() for g in (args.queues or "").split(",") if g.strip()] or list(settings.queue.all_groups)
    return run_worker(
        settings,
        groups=groups,
        concurrency=args.concurrency,
        threads=args.threads,
        name=args.name,
        wait_s=args.wait,
    )


def cmd_echo(settings: Settings, args: argparse.Namespace) -> int:

    status = echo(args.host, args.port, calling_ae=args.aet or settings.dicom.ae_title, called_ae=args.aec)
    print(
        f"C-ECHO {args.aec}@{args.host}:{args.port}: status 0x{status:04X} ({'success' if status == 0 else 'failure'})"
    )
    return 0 if status == 0 else 1


def cmd_send(settings: Settings, args: argparse.Namespace) -> int:
    from pydicom.errors import InvalidDicomError

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

    text, code = rules_report(settings, [Path(p) for p in args.paths])
    print(text)
    return code


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as db:
        print(f"database at {db.engine.url.render_as_string(hide_password=True)} is at the latest schema")
    return 0


def cmd_studies_list(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as db, db.session() as session:
        rows = query.list_studies(session, limit=args.limit).items
        if not rows:
            print("no studies received yet")
            return 0
        series = query.series_by_study(session, [row.study.id for row in rows]) if args.series else {}
        print(f"{'id':>5}  {'study date':10}  {'series':>6}  {'instances':>9}  {'jobs':14}  study instance UID")
        for row in rows:
            st = row.study
            job_txt = ",".join(f"{k.lower()}:{v}" for k, v in sorted(row.jobs.items())) or "-"
            counts = f"{row.series:>6}  {row.instances:>9}"
            print(f"{st.id:>5}  {st.study_date or '-':10}  {counts}  {job_txt:14}  {st.study_uid}")
            if args.series:
                for s in series[st.id]:
                    print(
                        f"         series {s.series_number if s.series_number is not None else '-':>4} "
                        f"{(s.modality or '?'):3} {s.instance_count:>5} inst  {s.state.value:9} "
                        f"{(s.series_description or '')[:40]:40}  {s.route_note or ''}"
                    )
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as db, db.session() as session:
        page = query.list_jobs(session, states=[args.state] if args.state else [], limit=args.limit)
        if not page.items:
            print("no jobs")
            return 0
        print(
            f"{'id':>5}  {'state':9}  {'prio':6}  {'pipeline':12}  {'created (UTC)':19}  {'secs':>6}  reason / result"
        )
        for row in page.items:
            j = row.job
            secs = (j.timings or {}).get("total")
            note = j.reason or ", ".join(f"{v['name']} {v['volume_ml']:.1f} mL" for v in row.volumes)
            if row.qc:
                note = "QC! " + note
            print(
                f"{j.id:>5}  {j.state.value:9}  {j.priority:6}  {j.pipeline[:12]:12}  "
                f"{j.created_at:%Y-%m-%d %H:%M:%S}  {secs if secs is not None else '-':>6}  {note[:90]}"
            )
    return 0


def cmd_jobs_show(settings: Settings, args: argparse.Namespace) -> int:

    with _database(settings) as db, db.session() as session:
        row = query.job_detail(session, args.id)
        if row is None:
            print(f"no job {args.id}", file=sys.stderr)
            return 1
        job = row.job
        fields = {
            "id": job.id,
            "state": job.state.value,
            "pipeline": job.pipeline,
            "route": job.route,
            "priority": job.priority,
            "study": row.study.study_uid if row.study else None,
            "inputs": job.inputs,
            "destinations": job.destinations,
            "reason": job.reason,
            "created_at": job.created_at.isoformat(),
            "queued_at": job.queued_at.isoformat() if job.queued_at else None,
            "published_at": job.published_at.isoformat() if job.published_at else None,
            "started_at": job.started_at.isoformat() if job.started_at else None,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "attempts": job.attempts,
            "worker": job.worker_id,
            "heartbeat_at": job.heartbeat_at.isoformat() if job.heartbeat_at else None,
            "model": {"name": job.model_name, "version": job.model_version, "sha256": job.model_checksums},
            "timings_s": job.timings,
            "metrics": job.metrics,
            "result": job.result_path,
        }
        print(json.dumps(fields, indent=2, ensure_ascii=False))
    return 0


def cmd_jobs_rerun(settings: Settings, args: argparse.Namespace) -> int:

    with _database(settings) as db:
        lines = rerun(db, study_uid=args.study, series_uid=args.series)
        for line in lines:
            print(line)
    return 0 if lines else 1


def cmd_deliveries_list(settings: Settings, args: argparse.Namespace) -> int:
    with _database(settings) as db, db.session() as session:
        rows = query.list_deliveries(
            session, states=[args.state] if args.state else [], destination=args.destination, limit=args.limit
        ).items
        if args.json:
            print(json.dumps([query.delivery_dict(r.delivery, r.output) for r in rows], indent=2))
            return 0
        if not rows:
            print("no deliveries" + (f" in state {args.state}" if args.state else ""))
            return 0
        print(
            f"{'id':>5}  {'job':>5}  {'kind':12}  {'destination':16}  {'state':11}  {'tries':>5}  "
            f"{'status':6}  {'updated (UTC)':19}  next / last error"
        )
        for r, out, _study in rows:
            status = query.shown_status(settings, r)
            note = r.last_error or ""
            if r.state.value == "pending" and r.next_attempt_at is not None:
                note = f"next {r.next_attempt_at:%H:%M:%S}" + (f"; {note}" if note else "")
            print(
                f"{r.id:>5}  {r.job_id:>5}  {(out.kind.value if out else '?'):12}  {r.destination[:16]:16}  "
                f"{r.state.value:11}  {r.attempts:>5}  {status if status is not None else '-':6}  "
                f"{r.updated_at:%Y-%m-%d %H:%M:%S}  {note[:100]}"
            )
    return 0


def cmd_deliveries_retry(settings: Settings, args: argparse.Namespace) -> int:

    with _database(settings) as db, db.session() as session:
        row = retry_delivery(session, args.id)
        print(f"delivery {row.id} to {row.destination} re-queued; the running node sends it at its next poll")
    return 0


def cmd_deliveries_cancel(settings: Settings, args: argparse.Namespace) -> int:

    with _database(settings) as db, db.session() as session:
        row = cancel_delivery(session, args.id)
        print(f"delivery {row.id} to {row.destination} cancelled")
    return 0


def cmd_conformance(settings: Settings, args: argparse.Namespace) -> int:

    text = conformance_statement(settings)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"conformance statement written to {args.out}")
    else:
        print(text)
    return 0


def _model_folder(settings: Settings, name: str) -> Path:
    """A model package folder from a path, a configured pipeline name or a shipped model name."""

    path = Path(name)
    if path.is_dir():
        return path
    if name in settings.pipelines:
        return Path(settings.pipelines[name].model)
    shipped = models_dir() / name
    if shipped.is_dir():
        return shipped
    raise PacsNodeError(
        f"model {name!r}: not a folder, a configured pipeline ({', '.join(sorted(settings.pipelines)) or 'none'}) "
        f"or a shipped model in {models_dir()}"
    )


def cmd_models_list(settings: Settings, args: argparse.Namespace) -> int:
    from inference.errors import ModelPackageError
    from inference.manifest import ModelPackage

    print(f"{'pipeline':<12} {'model':<24} {'version':<8} {'stages':>6}  {'kind':<28} folder")
    for name, pipe in sorted(settings.pipelines.items()):
        try:
            m = ModelPackage(pipe.model).manifest
            kind = "DEMO (synthetic phantoms)" if m.demo else m.intended_use[:28]
            print(f"{name:<12} {m.name:<24} {m.version:<8} {len(m.stages):>6}  {kind:<28} {pipe.model}")
        except ModelPackageError as exc:
            print(f"{name:<12} {'(unusable)':<24} {'':<8} {'':>6}  {str(exc).splitlines()[0][:60]}")
    return 0


def cmd_models_evaluate(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_lab.evaluation import evaluate_package, format_table

    folder = _model_folder(settings, args.model)

    def progress(row: dict[str, object]) -> None:
        if args.verbose:
            print(json.dumps(row), file=sys.stderr)

    result = evaluate_package(
        folder, cases=args.cases, seed=args.seed, task=args.task, allow_gpu=not args.cpu, progress=progress
    )
    print(format_table(result))
    out = Path(args.json) if args.json else Path(f"{result['model']}-evaluation-seed{args.seed}.json")
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten: {out}")
    return 0


def cmd_models_import(settings: Settings, args: argparse.Namespace) -> int:
    from inference.errors import ModelPackageError
    from inference.importer import import_nnunet, load_codes_file, summary

    try:
        codes = load_codes_file(args.codes) if args.codes else None
        result = import_nnunet(
            args.path,
            args.out,
            name=args.name,
            version=args.version,
            intended_use=args.intended_use,
            codes=codes,
            codes_origin=f"--codes {args.codes}",
            roles=args.role,
            configuration=args.configuration,
            checkpoint=args.checkpoint,
            orientation=args.orientation,
            force=args.force,
        )
    except ModelPackageError as exc:
        raise PacsNodeError(f"models import: {exc}") from exc
    print(summary(result))
    return 0


def cmd_demo(settings: Settings, args: argparse.Namespace) -> int:
    from pacs_node.app.demo import DEMO_CASES, run_demo

    if not args.verbose:  # the node's own INFO lines would bury the demo's table
        logging.getLogger().setLevel(logging.WARNING)
    chosen = args.pipelines.split(",") if args.pipelines else list(DEMO_CASES)
    pipelines = tuple(p.strip() for p in chosen if p.strip())
    unknown = [p for p in pipelines if p not in DEMO_CASES]
    if unknown:
        raise PacsNodeError(f"--pipelines: unknown {', '.join(unknown)}; the demo knows {', '.join(DEMO_CASES)}")
    results = run_demo(
        args.out,
        base=settings.model_dump(mode="json"),
        timeout_s=args.timeout,
        stream=sys.stdout,
        pipelines=pipelines,
        log_level=None if args.verbose else "WARNING",
    )
    return 0 if all(r.state == "done" for r in results) else 1


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

    p = sub.add_parser("serve", parents=[common], help="run the node: DICOM SCP, router, workers, dispatcher")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "worker",
        parents=[common],
        help="distributed mode: run inference jobs from the broker's queues (queue.backend: celery)",
        description="Consume the queues of the given pipeline groups and run their jobs, keeping models loaded. "
        "Needs queue.backend: celery, the PostgreSQL database_url of serve, and data_dir on the storage shared "
        "with serve (same path). SIGTERM finishes the running jobs, then stops.",
    )
    p.add_argument(
        "--queues",
        "-Q",
        default=None,
        metavar="GROUP[,GROUP...]",
        help="pipeline groups to consume, comma-separated (default: every group in queue.groups and "
        "queue.default_group)",
    )
    p.add_argument("--concurrency", type=int, default=1, help="jobs run in parallel, one process each (default 1)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads per job process (default: torch's own choice; 1 packs several workers on a CPU host)",
    )
    p.add_argument("--name", default=None, help="worker name in logs and Job.worker_id (default pacs-node.PID@HOST)")
    p.add_argument(
        "--wait",
        type=float,
        default=120.0,
        help="seconds to wait for serve to migrate the database and create the shared store (default 120)",
    )
    p.set_defaults(func=cmd_worker)

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

    p = sub.add_parser("deliveries", parents=[common], help="results sent (or to send) to destinations")
    dsub = p.add_subparsers(dest="deliveries_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("list", parents=[common], help="list recent deliveries")
    q.add_argument("--state", choices=["pending", "in_progress", "delivered", "failed", "cancelled"])
    q.add_argument("--destination", metavar="NAME")
    q.add_argument("--limit", type=int, default=50)
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    q.set_defaults(func=cmd_deliveries_list)
    q = dsub.add_parser("retry", parents=[common], help="re-queue a failed or cancelled delivery")
    q.add_argument("id", type=int)
    q.set_defaults(func=cmd_deliveries_retry)
    q = dsub.add_parser("cancel", parents=[common], help="cancel a pending or failed delivery")
    q.add_argument("id", type=int)
    q.set_defaults(func=cmd_deliveries_cancel)

    p = sub.add_parser(
        "demo",
        parents=[common],
        help="run the whole job here: start the node, send three phantom studies, receive SEG/SR/key images",
    )
    p.add_argument("--out", default="pacs-node-demo", help="output folder (default: ./pacs-node-demo)")
    p.add_argument("--pipelines", default=None, help="comma-separated subset of stroke,dentate,kidney")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the results")
    p.add_argument("--verbose", "-v", action="store_true", help="show the node's log lines")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("models", parents=[common], help="model packages")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="SUBCOMMAND")
    q = msub.add_parser("list", parents=[common], help="the configured pipelines' model packages")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser(
        "evaluate",
        parents=[common],
        help="Dice, volume errors and Pearson r (and stroke Dice by lesion size) on fresh phantoms",
    )
    q.add_argument("model", help="package folder, configured pipeline name or shipped model (stroke, dentate, kidney)")
    q.add_argument("--cases", type=int, default=10, help="number of phantoms (default 10)")
    q.add_argument("--seed", type=int, default=900_000, help="first phantom seed (training used 10000-19999)")
    q.add_argument("--task", default=None, help="phantom task (default: the model's phantom_task)")
    q.add_argument("--json", default=None, help="where to write the JSON (default ./<model>-evaluation-seed<S>.json)")
    q.add_argument("--cpu", action="store_true", help="never use a GPU")
    q.add_argument("--verbose", "-v", action="store_true", help="print each case as it finishes (stderr)")
    q.set_defaults(func=cmd_models_evaluate)
    q = msub.add_parser(
        "import",
        parents=[common],
        help="make a model package from an nnU-Net v2 results folder, its Dataset folder or its export zip",
        description="Copy a trained nnU-Net v2 model (a Trainer__Plans__configuration folder, the Dataset folder "
        "holding it, or the zip of nnUNetv2_export_model_to_zip) into a pacs-node model package: model.yaml with "
        "one input role per channel, the labels with codes and colours, one nnunet stage, and the SHA-256 of every "
        "checkpoint, which the node checks before loading it. Segments are validated (sent to the PACS) unless "
        "the --codes file says validated: false. See docs/models.md, 'Bring your own model'.",
    )
    q.add_argument("path", metavar="PATH", help="results folder, Dataset folder, or nnU-Net's model zip")
    q.add_argument("--out", required=True, metavar="DIR", help="the model package folder to write")
    q.add_argument("--name", default=None, help="model name (default: from the Dataset folder, e.g. dataset220-kits)")
    q.add_argument("--version", default="1.0.0", help="model version (default 1.0.0)")
    q.add_argument(
        "--intended-use",
        default=None,
        help="what the model is for (default: 'imported, not validated by this node' ...)",
    )
    q.add_argument(
        "--codes",
        default=None,
        metavar="FILE.yaml",
        help="label name or value -> {type, category, laterality, color, name, validated, anatomy}; types and "
        "categories as keys of inference/codes.py or {value, meaning, scheme}",
    )
    q.add_argument(
        "--role",
        action="append",
        default=[],
        metavar="INDEX=NAME[:b=VALUE][:optional]",
        help="name a channel's input role (default: its channel_names entry, lower case), e.g. 0=dwi:b=1000, "
        "2=flair:optional; repeatable",
    )
    q.add_argument(
        "--configuration",
        default=None,
        help="which results folder when PATH holds several (its name, or e.g. 3d_fullres)",
    )
    q.add_argument("--checkpoint", default="checkpoint_final.pth", help="checkpoint file of each fold")
    q.add_argument(
        "--orientation",
        default=None,
        metavar="CODE",
        help="orientation the model was trained in (DICOMOrient code such as RAS or LPS; default: as the series lies)",
    )
    q.add_argument("--force", action="store_true", help="replace --out when it is a model package")
    q.set_defaults(func=cmd_models_import)

    p = sub.add_parser(
        "conformance", parents=[common], help="the DICOM conformance statement of this configuration (Markdown)"
    )
    p.add_argument("--out", default=None, help="write it to this file instead of printing it")
    p.set_defaults(func=cmd_conformance)
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
