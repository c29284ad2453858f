"""``tracker dlq``: look at, retry and purge dead letters (see tracker/dlq.py)."""

from __future__ import annotations

import sys

import click

from tracker import dlq as dead
from tracker.cli.app import cli, pass_app
from tracker.cli.output import echo_json

_partition = click.option("--partition", type=click.IntRange(0), metavar="P",
                          help="Only this partition. [default: all]")


@cli.group()
def dlq():
    """Dead letters: log entries the projector refused, each with its reason."""


@dlq.command("list")
@_partition
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.option("--limit", type=click.IntRange(1), metavar="N", help="Show at most N.")
@pass_app
def list_(app, partition, as_json, limit):
    """Show dead letters, oldest first per partition."""
    letters = dead.list_dead(app.deployment, partition, limit=limit)
    for dl in letters:
        if as_json:
            echo_json(dl.as_dict())
        else:
            fields = " ".join(f"{k}={v!r}" for k, v in dl.as_dict()["fields"])
            click.echo(f"{dl.ref} (log {dl.original_id}) {dl.reason}: {fields}")
    if not as_json:
        click.echo(f"{len(letters)} dead letters", err=True)


@dlq.command("retry")
@click.argument("ids", nargs=-1, metavar="[ID|P/ID...]")
@_partition
@click.option("--force", is_flag=True,
              help="Re-append even entries that would still be refused.")
@pass_app
def retry(app, ids, partition, force):
    """Re-append dead letters (all, or these) to their partition's log after a fix.

    IDs are as `tracker dlq list` prints them (P/ID); a bare ID is enough when only
    one partition has it.
    Entries that would still be refused stay in the DLQ unless --force.
    Exit status 1 if an ID was not found or an entry was skipped.
    """
    res = dead.retry(app.deployment, ids, partition, force)
    for old, new in res.retried:
        click.echo(f"retried {old} as {new}")
    for old, reason in res.skipped:
        click.echo(f"skipped {old}: still refused ({reason})", err=True)
    for old in res.missing:
        click.echo(f"not found: {old}", err=True)
    click.echo(f"{len(res.retried)} retried, {len(res.skipped)} skipped, "
               f"{len(res.missing)} not found", err=True)
    if res.skipped or res.missing:
        sys.exit(1)


@dlq.command("purge")
@_partition
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@pass_app
def purge(app, partition, yes):
    """Delete dead letters for good."""
    if not yes:
        n = dead.count(app.deployment) if partition is None else len(
            dead.list_dead(app.deployment, partition))
        if not sys.stdin.isatty():
            raise click.UsageError(f"dlq purge would delete {n} dead letters and there is no "
                                   "terminal to confirm on: pass --yes")
        click.confirm(f"Delete {n} dead letters?", abort=True)
    click.echo(f"purged {dead.purge(app.deployment, partition)} dead letters")
