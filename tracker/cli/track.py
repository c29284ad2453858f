"""The job's own commands: ``emit`` (the job server's side), ``set`` (the worker's)
and ``get`` (anyone's)."""

from __future__ import annotations

import datetime as dt
import json

import click

from tracker import events, history
from tracker.cli.app import App, cli, pass_app
from tracker.cli.output import echo_json
from tracker.errors import ValidationError
from tracker.publisher import Publisher
from tracker.times import format_ms, parse_when


@cli.group()
def emit():
    """Publish a job lifecycle event (the job server's side)."""


def _emit(app: App, event: events.AnyEvent) -> None:
    click.echo(Publisher(app.deployment).publish(event)[0])


def _custom(custom: str | None, track: bool) -> dict | None:
    parsed = None
    if custom is not None:
        try:
            parsed = json.loads(custom)
        except json.JSONDecodeError as e:
            raise ValidationError("custom", f"not valid JSON ({e.msg})") from None
        except RecursionError:
            raise ValidationError("custom", "JSON nested too deeply") from None
        if not isinstance(parsed, dict):
            raise ValidationError("custom", "expected a JSON object")
    if track:
        parsed = {**(parsed or {}), "track": 1}
    return parsed


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
    _emit(app, events.make_enqueued(jid, _custom(custom, track), queue, jobtype, reserve_for))


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


def _failure_command(name: str, cls: type, doc: str) -> None:
    @emit.command(name, help=doc)
    @click.argument("jid")
    @click.option("--errtype", metavar="E")
    @click.option("--message", metavar="M")
    @pass_app
    def command(app, jid, errtype, message):
        _emit(app, events.make_failure(cls, jid, errtype, message))


_failure_command("failed", events.Failed, "FAIL with retries left.")
_failure_command("dead", events.Dead, "FAIL with retries exhausted.")


def _an_hour_from_now() -> str:
    """An example --reserve-until that is valid when the help is shown."""
    return f"{dt.datetime.now(dt.UTC) + dt.timedelta(hours=1):%Y-%m-%dT%H:%M:%SZ}"


@cli.command("set")
@click.argument("jid")
@click.option("--percent", type=int, metavar="N", help="0..100")
@click.option("--desc", metavar="TEXT")
@click.option("--reserve-until", metavar="RFC3339",
              help=f"Extend the reservation to this time, at most a day ahead, with a timezone: "
                   f"e.g. {_an_hour_from_now()} (an hour from now).")
@pass_app
def set_(app, jid, percent, desc, reserve_until):
    """TRACK SET: report a job's progress (the worker's side). Give at least one of
    --percent, --desc, --reserve-until."""
    events.check_jid(jid)  # a bad JID is the first thing to hear about
    if percent is None and desc is None and reserve_until is None:
        raise click.UsageError("set: nothing to set; give --percent, --desc or --reserve-until")
    event = events.make_trackset(jid, percent, desc, reserve_until)
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
        now = history.redis_now_ms(app.deployment)
        when = parse_when(at, now, "at")
        if when > now:
            raise ValidationError("at", f"{at!r} is in the future (Redis's clock reads "
                                        f"{format_ms(now)}); the past only")
        for jid in jids:
            echo_json(app.tracker.get_at(jid, when))
        return
    for answer in app.tracker.get_many(jids):
        echo_json(answer)
