"""``tracker list``: live tracks by state, newest update first, from the projector's
list index (``Tracker.list_tracks``; never a scan of the keyspace)."""

from __future__ import annotations

import click

from tracker.cli.app import cli, pass_app
from tracker.cli.output import echo_json

STATES = ("enqueued", "working", "success", "failed", "dead")


@cli.command("list")
@click.option("--state", type=click.Choice(STATES), required=True)
@click.option("--queue", metavar="Q", help="Only jobs enqueued on this queue.")
@click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
@click.option("--cursor", metavar="C", help="Continue after a previous page (printed on stderr).")
@click.option("--json", "as_json", is_flag=True, help="One TRACK GET object per line.")
@pass_app
def list_(app, state, queue, limit, cursor, as_json):
    """List live tracks in one state (and queue), newest update first."""
    page = app.tracker.list_tracks(state, queue=queue, limit=limit, cursor=cursor)
    for track in page.tracks:
        if as_json:
            echo_json(track)
            continue
        pct = f"{track['percent']:>3}%" if "percent" in track else "    "
        click.echo(f"{track['updated_at']:<20}  {track['state']:<8} {pct}  {track['jid']}"
                   f"  {track.get('desc', '')}".rstrip())
    if page.next_cursor:
        click.echo(f"more: tracker list --state {state} --cursor {page.next_cursor}", err=True)
    elif not page.tracks and not as_json:
        click.echo(f"no {state} tracks", err=True)
