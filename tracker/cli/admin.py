"""Looking after a deployment: ``status`` and the embedded server."""

from __future__ import annotations

from pathlib import Path

import click

from tracker.cli.app import cli, pass_app
from tracker.cli.output import echo_json
from tracker.status import node_summary, partition_status
from tracker.store import embedded as emb


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app, as_json):
    """Show each partition: log length, lag, dead letters, events folded, and on a Redis
    Cluster the master that serves it."""
    rows = partition_status(app.deployment)
    nodes = node_summary(rows)
    if as_json:
        echo_json({"where": app.settings.where(), "cluster": app.deployment.cluster,
                   "nodes": nodes, "partitions": rows})
        return
    click.echo(f"{app.settings.where()}, prefix {app.settings.prefix!r}, "
               f"{len(rows)} partitions")
    if nodes:
        click.echo(f"Redis Cluster, {len(nodes)} masters: " +
                   ", ".join(f"{n} serves {k}" for n, k in nodes.items()))
    node = f" {'node':<21}" if nodes else ""
    click.echo(f"{'part':>4} {'log':>9} {'lag':>7} {'pending':>7} {'dlq':>6} {'folded':>10}{node}")
    for r in rows:
        node = f" {r['node']:<21}" if nodes else ""
        click.echo(f"{r['partition']:>4} {r['length']:>9} {r['lag']:>7} {r['pending']:>7} "
                   f"{r['dead_letters']:>6} {r['folded']:>10}{node}".rstrip())


@cli.group()
def embedded():
    """Manage the embedded Redis (used when no --redis-url is given)."""


@embedded.command("stop")
@pass_app
def embedded_stop(app):
    """Shut the embedded Redis down (its data stays in --data-dir)."""
    click.echo("stopped" if emb.stop(app.settings.data_dir) else "not running")


@embedded.command("path")
@pass_app
def embedded_path(app):
    """Print the embedded Redis's socket (redis-cli -s PATH, or --redis-url unix://PATH).

    Starts nothing: when the server is not running, the path is printed all the same
    and stderr says so (any other command starts it).
    """
    data_dir = app.settings.data_dir
    click.echo(str(emb.socket_path(Path(data_dir).expanduser().absolute())))
    if not emb.running(data_dir):
        click.echo("tracker: the embedded Redis is not running; any tracker command that "
                   "needs it starts it", err=True)
