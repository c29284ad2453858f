"""Recovery and audit: replay, history, trim, export, import.

Long work reports progress on stderr: a progress bar on a terminal, a line
every few seconds otherwise.
"""

from __future__ import annotations

import sys

import click

from tracker import archive
from tracker import history as hist
from tracker import replay as rp
from tracker import retention as ret
from tracker.cli.app import cli, pass_app
from tracker.cli.output import Progress, echo_json
from tracker.errors import ValidationError
from tracker.times import format_ms


@cli.command()
@click.option("--partition", type=int, metavar="P", help="Only this partition.")
@click.option("--verify", is_flag=True, help="Compare the live snapshots with the log; write nothing.")
@click.option("--keep-old", is_flag=True, help="Leave the old generation's keys to expire on "
                                               "their own instead of unlinking them.")
@click.option("--force", is_flag=True, help="Rebuild even when a short retention may have "
                                            "trimmed away every event of some live track.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def replay(app, partition, verify, keep_old, force, as_json):
    """Rebuild every snapshot from the log, live (or audit them with --verify).

    The rebuild folds into a new generation of keys while projectors and producers
    run, catches up with the live projector and switches atomically per partition.
    --verify exits 0 when everything that can be verified is equal, 1 otherwise.
    """
    d = app.deployment
    prog = Progress("verify" if verify else "replay", rp.log_length(d, partition))
    try:
        if verify:
            res = rp.verify(d, partition, prog)
        else:
            done = rp.rebuild(d, partition, prog, unlink_old=not keep_old, force=force)
    finally:
        prog.close()
    if verify:
        diffs = [{"jid": x.jid, "partition": x.partition,
                  "fields": {k: {"live": a, "log": b} for k, (a, b) in x.fields.items()}}
                 for x in res.different]
        if as_json:
            echo_json({**res.summary(), "differences": diffs,
                                     "cannot_verify_jids": [j for j, _ in res.cannot_verify]})
        else:
            s = res.summary()
            click.echo(f"checked {s['checked']} jids: {s['equal']} equal, {s['different']} "
                       f"different, {s['cannot_verify']} cannot verify")
            for x in res.different:
                shown = ", ".join(f"{k} live={a!r} log={b!r}" for k, (a, b) in x.fields.items())
                click.echo(f"different {x.jid}: {shown}")
            for jid, why in res.cannot_verify:
                click.echo(f"cannot verify {jid}: {why}")
        sys.exit(0 if res.ok else 1)
    rows = [r.__dict__ for r in done]
    if as_json:
        echo_json({"partitions": rows})
        return
    for r in done:
        click.echo(f"partition {r.partition}: generation {r.old_gen} -> {r.new_gen}, folded "
                   f"{r.folded} events ({r.poisoned} poison skipped, {r.kept} kept: beginning "
                   f"trimmed) in {r.seconds:.2f}s; {r.unlinked} old keys unlinked")
    total = sum(r.folded + r.poisoned for r in done)
    secs = sum(r.seconds for r in done)
    click.echo(f"replayed {total} events in {secs:.2f}s ({total / secs if secs else 0:,.0f}/s)")


@cli.command()
@click.argument("jid")
@click.option("--json", "as_json", is_flag=True, help="JSON lines.")
@pass_app
def history(app, jid, as_json):
    """A job's events in order (time, event, fields), also after its track expired."""
    h = app.tracker.history(jid)
    if h.trimmed:
        click.echo(f"{jid}: {len(h.trimmed)} earlier events are past retention (trimmed)",
                   err=True)
    for e in h.entries:
        rec = e.as_json()
        if as_json:
            echo_json(rec)
        else:
            fields = " ".join(f"{k}={v}" for k, v in rec["fields"].items())
            click.echo(f"{rec['time']}  {rec['event']:<9} {fields}".rstrip())
    if not h.entries and not as_json:
        click.echo(f"{jid}: no history (unknown, untracked, or older than retention)", err=True)


@cli.command()
@click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
@click.option("--retention", envvar="TRACKER_RETENTION", show_envvar=True, metavar="DURATION",
              help="Keep this much of the log, e.g. 7d, 36h. Stored for the projector "
                   "(unless --dry-run). [default: stored, else 7d]")
@click.option("--partition", type=int, metavar="P")
@click.option("--json", "as_json", is_flag=True)
@pass_app
def trim(app, dry_run, retention, partition, as_json):
    """Trim the log by age; never an entry a consumer group still needs."""
    d = app.deployment
    ms = ret.resolve(d, retention)
    rows = ret.trim(d, ms, partition, dry_run)
    if as_json:
        echo_json({"retention_ms": ms, "partitions": [r.__dict__ for r in rows]})
        return
    verb = "would remove" if dry_run else "removed"
    for r in rows:
        where = f"entries before {r.minid}" if r.minid else "nothing"
        click.echo(f"partition {r.partition}: {verb} {r.removed} ({where}; limited by "
                   f"{r.limited_by})")
    click.echo(f"{verb} {sum(r.removed for r in rows)} entries (retention {ms // 1000}s)")


@cli.command()
@click.option("--since", metavar="TIME", help="RFC 3339 or relative (-2d).")
@click.option("--until", metavar="TIME", help="RFC 3339 or relative (-1h).")
@click.option("--jid", metavar="JID", help="Only this job (from its history index).")
@click.option("-o", "--output", type=click.File("w"), default="-", help="File [default: stdout].")
@pass_app
def export(app, since, until, jid, output):
    """Write the log as JSON lines (original ID and time), for archives."""
    d = app.deployment
    lo = hist.parse_at(d, since, "since") if since else None
    hi = hist.parse_at(d, until, "until") if until else None
    if lo is not None and hi is not None and lo > hi:
        raise ValidationError("since", f"{since!r} is later than --until {until!r} "
                                       f"({format_ms(lo)} > {format_ms(hi)})")
    if jid:  # one job's entries come from its history index: fold the log first
        app.tracker.settle([d.partition(jid)])
    prog = Progress("export", None if jid else rp.log_length(d))
    try:
        n = archive.export(d, output, lo, hi, jid, prog)
    finally:
        prog.close()
    click.echo(f"exported {n} entries", err=True)


@cli.command("import")
@click.argument("file", type=click.File("r"))
@pass_app
def import_(app, file):
    """Append an export into an empty deployment, keeping IDs and order."""
    prog = Progress("import")
    try:
        res = archive.import_(app.deployment, file, prog)
    finally:
        prog.close()
    click.echo(f"imported {res.imported} entries ({res.renumbered} renumbered); "
               "run `tracker project` or `tracker replay` to fold them")
