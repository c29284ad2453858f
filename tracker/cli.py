"""The ``tracker`` command line. Commands stay thin: parse, call the API, print.

Errors: one line on stderr, exit 2 for usage and validation, 1 for runtime
trouble (Redis unreachable). Passwords in URLs are never printed.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

import click
import msgspec
import redis

from tracker import events
from tracker.cliapp import App, pass_app
from tracker.config import Settings
from tracker.errors import TrackerError, ValidationError

_json = msgspec.json.Encoder()




@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="TRACKER_REDIS_URL", show_envvar=True, metavar="URL",
              help="redis://, rediss:// or unix:// URL (user and password allowed). "
                   "Default: an embedded Redis under --data-dir.")
@click.option("--data-dir", envvar="TRACKER_DATA_DIR", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the embedded Redis keeps its data. [default: ~/.local/share/tracker]")
@click.option("--prefix", envvar="TRACKER_PREFIX", show_envvar=True, default="tracker",
              show_default=True, help="Key prefix: one deployment per prefix.")
@click.option("--partitions", envvar="TRACKER_PARTITIONS", show_envvar=True, type=int,
              help="Stream partitions, fixed when a deployment is first used. [default: 4]")
@click.option("--ttl", envvar="TRACKER_TTL", show_envvar=True, type=int,
              help="Seconds a track lives after its last update or reservation, fixed when a "
                   "deployment is first used. [default: 1800]")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="tracker")
@click.pass_context
def cli(ctx, redis_url, data_dir, prefix, partitions, ttl, verbose):
    """Job tracking for any job server: Faktory's TRACK GET / TRACK SET on Redis Streams."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = App(Settings.from_env(redis_url=redis_url, data_dir=data_dir, prefix=prefix,
                                    partitions=partitions, ttl=ttl))
    ctx.obj.verbose = verbose


# --------------------------------------------------------------------------- emit
@cli.group()
def emit():
    """Publish a job lifecycle event (the job server's side)."""


def _emit(app: App, event) -> None:
    from tracker.publisher import Publisher

    click.echo(Publisher(app.deployment).publish(event)[0])


@emit.command("enqueued")
@click.argument("jid")
@click.option("--custom", metavar="JSON", help='The job\'s custom attributes, e.g. \'{"track":1}\'.')
@click.option("--track", is_flag=True, help='Short for --custom \'{"track":1}\'.')
@click.option("--queue", metavar="Q")
@click.option("--jobtype", metavar="T")
@click.option("--reserve-for", type=int, metavar="SECONDS", help="Default 1800, clamped to 60..86400.")
@pass_app
def emit_enqueued(app, jid, custom, track, queue, jobtype, reserve_for):
    """PUSH (or a retry re-enqueued)."""
    parsed = None
    if custom is not None:
        try:
            parsed = json.loads(custom)
        except ValueError as e:
            raise ValidationError("custom", f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValidationError("custom", "JSON nested too deeply") from None
        if not isinstance(parsed, dict):
            raise ValidationError("custom", "expected a JSON object")
    if track:
        parsed = {**(parsed or {}), "track": 1}
    _emit(app, events.make_enqueued(jid, parsed, queue, jobtype, reserve_for))


@emit.command("working")
@click.argument("jid")
@click.option("--reserve-for", type=int, metavar="SECONDS")
@pass_app
def emit_working(app, jid, reserve_for):
    """FETCH: a worker took the job; its reservation starts."""
    _emit(app, events.make_working(jid, reserve_for))


@emit.command("success")
@click.argument("jid")
@pass_app
def emit_success(app, jid):
    """ACK."""
    _emit(app, events.make_success(jid))


def _failure_command(name: str, cls, doc: str):
    @emit.command(name, help=doc)
    @click.argument("jid")
    @click.option("--errtype", metavar="E")
    @click.option("--message", metavar="M")
    @pass_app
    def command(app, jid, errtype, message):
        _emit(app, events.make_failure(cls, jid, errtype, message))

    return command


_failure_command("failed", events.Failed, "FAIL with retries left.")
_failure_command("dead", events.Dead, "FAIL with retries exhausted.")


# ---------------------------------------------------------------------- set / get
@cli.command("set")
@click.argument("jid")
@click.option("--percent", type=int, metavar="N", help="0..100")
@click.option("--desc", metavar="TEXT")
@click.option("--reserve-until", metavar="RFC3339", help="Extend the reservation, e.g. "
                                                         "2020-08-01T11:43:20Z (at most a day ahead).")
@pass_app
def set_(app, jid, percent, desc, reserve_until):
    """TRACK SET: report a job's progress (the worker's side)."""
    event = events.make_trackset(jid, percent, desc, reserve_until)
    from tracker.publisher import Publisher

    Publisher(app.deployment).publish(event)
    click.echo("OK")


@cli.command()
@click.argument("jids", nargs=-1, required=True, metavar="JID...")
@click.option("--at", metavar="TIME", help="The track as it stood then: RFC 3339 or relative "
                                           "(-10m), folded from the job's history.")
@pass_app
def get(app, jids, at):
    """TRACK GET: print each job's track, one JSON object per line."""
    if at is not None:
        from tracker import history

        when = history.parse_when(at, history.redis_now_ms(app.deployment))
        for jid in jids:
            click.echo(_json.encode(history.track_at(app.deployment, jid, when)))
        return
    for answer in app.tracker.get_many(jids):
        click.echo(_json.encode(answer))


_WATCH_EXIT = {"success": 0, "failed": 3, "dead": 3, "unknown": 4}


@cli.command()
@click.argument("jid")
@click.option("--interval", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="Seconds between polls.")
@pass_app
def watch(app, jid, interval):
    """Follow a job's track live until it finishes.

    Exit status: 0 success, 3 failed or dead, 4 unknown (untracked or expired).
    """
    from tracker.watch import follow

    sys.exit(_WATCH_EXIT[follow(app.tracker, jid, interval)])


# ------------------------------------------------------------------------ project
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
@pass_app
def project(app, consumer, once, batch, claim_idle, grace, as_json):
    """Run the projector: fold the event log into one snapshot per job."""
    from tracker.projector import Projector

    if grace is not None:
        app.settings.grace = grace
    proj = Projector(app.deployment, consumer=consumer, batch=batch, claim_idle_ms=claim_idle)
    if once:
        t0 = time.perf_counter()
        n = proj.drain()
        secs = time.perf_counter() - t0
        totals = {"entries": n, "folded": proj.totals.folded,
                  "dead_lettered": proj.totals.dead_lettered, "seconds": round(secs, 3),
                  "per_second": round(n / secs) if secs > 0 else 0}
        click.echo(_json.encode(totals) if as_json else
                   f"folded {totals['folded']} events, dead-lettered {totals['dead_lettered']} "
                   f"in {secs:.2f}s ({totals['per_second']}/s)")
        return
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: proj.stop())
    # A daemon reports what it does by default (batches, rates, claims, DLQ); -v adds each batch.
    logging.getLogger("tracker").setLevel(logging.DEBUG if app.verbose else logging.INFO)
    proj.run()


# ------------------------------------------------------------------ status / demo
@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app, as_json):
    """Show each partition: log length, lag, dead letters, events folded."""
    from tracker.status import partition_status

    rows = partition_status(app.deployment)
    if as_json:
        click.echo(_json.encode({"where": app.settings.where(), "partitions": rows}))
        return
    click.echo(f"{app.settings.where()}, prefix {app.settings.prefix!r}, "
               f"{len(rows)} partitions")
    click.echo(f"{'part':>4} {'log':>9} {'lag':>7} {'pending':>7} {'dlq':>6} {'folded':>10}")
    for r in rows:
        click.echo(f"{r['partition']:>4} {r['length']:>9} {r['lag']:>7} {r['pending']:>7} "
                   f"{r['dead_letters']:>6} {r['folded']:>10}")


@cli.command()
@click.option("--jobs", type=click.IntRange(1, 50), default=6, show_default=True)
@pass_app
def demo(app, jobs):
    """Simulate a job server and workers, project live and show the tracks move."""
    from tracker.demo import run_demo

    run_demo(app, jobs)


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=7419, show_default=True)
@click.option("--password", envvar="TRACKER_PASSWORD", show_envvar=True,
              help="Require this password in HELLO (Faktory's pwdhash).")
@click.option("--max-line", type=click.IntRange(64), default=1024 * 1024, show_default=True,
              metavar="BYTES", help="Longest command line accepted; longer closes the connection.")
@click.option("--idle-timeout", type=click.FloatRange(0.1), default=300.0, show_default=True,
              metavar="SECONDS", help="Close a connection idle this long.")
@click.option("--max-connections", type=click.IntRange(1), default=1000, show_default=True)
@click.option("--handshake-timeout", type=click.FloatRange(0.1), default=5.0, show_default=True,
              metavar="SECONDS", help="Time a client has to send HELLO.")
@pass_app
def serve(app, **options):
    """Serve the Faktory Work Protocol: TRACK GET / TRACK SET for unmodified Faktory clients."""
    from tracker.server import run

    run(app.settings, **options)


@cli.group()
def embedded():
    """Manage the embedded Redis (used when no --redis-url is given)."""


@embedded.command("stop")
@pass_app
def embedded_stop(app):
    """Shut the embedded Redis down (its data stays in --data-dir)."""
    from tracker import embedded as emb

    click.echo("stopped" if emb.stop(app.settings.data_dir) else "not running")


@embedded.command("path")
@pass_app
def embedded_path(app):
    """Print the embedded Redis's socket (redis-cli -s PATH, or --redis-url unix://PATH)."""
    from tracker import embedded as emb

    click.echo(str(emb.ensure(app.settings.data_dir)))


def main() -> None:
    try:
        rv = cli.main(standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.Abort:
        click.echo("tracker: aborted", err=True)
        sys.exit(1)
    except click.ClickException as e:
        click.echo(f"tracker: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except TrackerError as e:
        click.echo(f"tracker: error: {e}", err=True)
        sys.exit(e.exit_code)
    except redis.RedisError as e:
        click.echo(f"tracker: error: Redis: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


# ------------------------------------------------------------ extension commands
# Commands that live in their own modules register here (one line each).
from tracker.cli_dlq import dlq  # noqa: E402
cli.add_command(dlq)
from tracker.cli_replay import export, history, import_, replay, trim  # noqa: E402
for _command in (replay, history, trim, export, import_):
    cli.add_command(_command)


if __name__ == "__main__":
    main()
