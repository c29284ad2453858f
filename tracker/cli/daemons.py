"""The long-running processes: ``project`` (the fold) and ``serve`` (the Faktory endpoint)."""

from __future__ import annotations

import logging
import signal
import time

import click

from tracker.cli.app import cli, pass_app
from tracker.cli.output import echo_json
from tracker.errors import ConfigError
from tracker.projector import Projector
from tracker.server import fwp, proxy, web


@cli.command()
@click.option("--consumer", metavar="NAME", help="Consumer name. [default: host-pid]")
@click.option("--once", is_flag=True, help="Fold what the log holds now, then exit.")
@click.option("--batch", type=click.IntRange(1, 5000), default=500, show_default=True,
              help="Entries per atomic fold step.")
@click.option("--claim-idle", type=click.IntRange(0), default=60_000, show_default=True,
              metavar="MS", help="Idle time before another reader's pending entries are claimed.")
@click.option("--grace", type=click.IntRange(0), envvar="TRACKER_GRACE", show_envvar=True,
              metavar="SECONDS", help="How long a snapshot key outlives its expiry, so late events "
                                      "still meet it. [default: 300]")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the totals as JSON.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), metavar="PORT",
              help="Serve this process's counters for Prometheus on 127.0.0.1:PORT/metrics "
                   "(needs the web extra).")
@pass_app
def project(app, consumer, once, batch, claim_idle, grace, as_json, metrics_port):
    """Run the projector: fold the event log into one snapshot per job."""
    if grace is not None:
        app.settings.grace = grace
    proj = Projector(app.deployment, consumer=consumer, batch=batch, claim_idle_ms=claim_idle)
    if metrics_port is not None:
        port = web.load("metrics").serve_projector(proj.totals, metrics_port)
        click.echo(f"tracker project: metrics on http://127.0.0.1:{port}/metrics", err=True)
    if once:
        t0 = time.perf_counter()
        n = proj.drain()
        secs = time.perf_counter() - t0
        totals = {"entries": n, "folded": proj.totals.folded,
                  "dead_lettered": proj.totals.dead_lettered, "seconds": round(secs, 3),
                  "per_second": round(n / secs) if secs > 0 else 0}
        if as_json:
            echo_json(totals)
        else:
            click.echo(f"folded {totals['folded']} events, dead-lettered "
                       f"{totals['dead_lettered']} in {secs:.2f}s ({totals['per_second']}/s)")
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proj.stop())
    # A daemon reports what it does by default (batches, rates, claims, DLQ); -v adds each batch.
    logging.getLogger("tracker").setLevel(logging.DEBUG if app.verbose else logging.INFO)
    proj.run()


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=7419, show_default=True)
@click.option("--password", envvar="TRACKER_PASSWORD", show_envvar=True,
              help="Require this password in HELLO (Faktory's pwdhash). Not with --upstream, "
                   "where clients authenticate with the Faktory server.")
@click.option("--upstream", envvar="TRACKER_UPSTREAM", show_envvar=True, metavar="URL",
              help="Proxy to this Faktory server (tcp://[:PASSWORD@]HOST:PORT or tcp+tls://): "
                   "forward every command, answer TRACK here, publish the lifecycle events seen.")
@click.option("--upstream-ca", envvar="TRACKER_UPSTREAM_CA", show_envvar=True, metavar="FILE",
              type=click.Path(dir_okay=False), help="CA bundle for a tcp+tls:// upstream "
                                                    "[default: the system's].")
@click.option("--max-line", type=click.IntRange(64), default=1024 * 1024, show_default=True,
              metavar="BYTES", help="Longest command line accepted; longer closes the connection.")
@click.option("--idle-timeout", type=click.FloatRange(0.1), metavar="SECONDS",
              help="Close a connection idle this long. [default: 300; never with --upstream]")
@click.option("--max-connections", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--handshake-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              metavar="SECONDS", help="Time a client has to send HELLO.")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              envvar="TRACKER_SERVE_WORKERS", show_envvar=True,
              help="Server processes sharing the port (SO_REUSEPORT, Linux): one answers on "
                   "one core. Limits such as --max-connections are per worker.")
@click.option("--no-uvloop", is_flag=True, help="Use asyncio's own event loop even if uvloop is "
                                                "installed (pip install 'tracker[fast]').")
@pass_app
def serve(app, upstream, upstream_ca, password, no_uvloop, **options):
    """Serve the Faktory Work Protocol: TRACK GET / TRACK SET for unmodified Faktory clients.

    With --upstream, be a transparent proxy in front of an open-source Faktory server:
    point FAKTORY_URL at tracker and tracked jobs get Enterprise-style tracking.
    """
    if not upstream:
        fwp.run(app.settings, password=password, fast_loop=not no_uvloop, **options)
        return
    if password:
        raise ConfigError("password: not used with --upstream (clients authenticate with the "
                          "Faktory server's own password); unset --password/TRACKER_PASSWORD")
    proxy.run(app.settings, proxy.Upstream.parse(upstream, upstream_ca),
              fast_loop=not no_uvloop, **options)
