"""``tracker demo``: the whole loop on one screen, on the embedded Redis by default.

A simulated job server pushes tracked and untracked jobs; simulated workers
report progress; one job fails once and then succeeds on its retry, one dies;
a projector folds the log in a background thread while the view polls
TRACK GET. It says up front, beside each job and at the end why two jobs stay
``unknown`` (untracked) and why a bar falls back to 0% (a retry), then prints the
final TRACK GET answers.
"""

from __future__ import annotations

import datetime as dt
import random
import shutil
import sys
import threading
import time

import click

from tracker.cli.app import cli, pass_app
from tracker.cli.output import echo_json
from tracker.cli.watch import COLORS, render
from tracker.projector import Projector
from tracker.publisher import Publisher
from tracker.query import Tracker
from tracker.store.boundary import redis_errors
from tracker.store.connection import create_client
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings

STEPS = ["Fetching input", "Parsing", "Calculating...", "Rendering", "Uploading", "Clearing caches..."]
# (name, tracked, attempts that fail before the last, dies at the end)
PLANS = [("report", True, 0, False), ("invoice", True, 1, False), ("export", True, 2, True),
         ("thumbnail", False, 0, False), ("backup", True, 0, False), ("email", False, 0, False)]


UNTRACKED = "untracked"


def _job(pub: Publisher, tracker: Tracker, jid: str, plan, rng: random.Random, stop,
         notes: dict) -> None:
    """One job's life; ``notes[jid]`` says, for the view, what just happened to it."""
    name, tracked, fails, dies = plan
    custom = {"track": 1} if tracked else {}
    pub.enqueued(jid, custom=custom, queue="default", jobtype=name.title() + "Job")
    time.sleep(rng.uniform(0.3, 1.2))  # waiting in the queue
    for attempt in range(fails + 1):
        if stop.is_set():
            return
        pub.working(jid, reserve_for=600)
        last = attempt == fails
        upto = 100 if (last and not dies) else rng.choice([30, 55, 70])
        for pct in range(0, upto + 1, 10):
            desc = STEPS[min(pct * len(STEPS) // 101, len(STEPS) - 1)]
            until = None
            if name == "backup" and pct == 50:  # a long job asks for more time
                until = dt.datetime.now(dt.UTC) + dt.timedelta(hours=2)
            tracker.set(jid, percent=pct, desc=desc, reserve_until=until)
            time.sleep(rng.uniform(0.08, 0.25))
        if last and not dies:
            pub.success(jid)
            if fails and tracked:
                notes[jid] = f"done on retry {fails}"
        elif last:
            pub.dead(jid, errtype="TimeoutError", message="gave up after 3 attempts")
            if tracked:
                notes[jid] = "dead: no retries left"
        else:
            pub.failed(jid, errtype="ConnectionError", message="upstream reset the connection")
            if tracked:
                notes[jid] = f"failed: retry {attempt + 1} of {fails}, from 0%"
            time.sleep(0.4)
            pub.enqueued(jid, custom=custom, queue="default", jobtype=name.title() + "Job")
            time.sleep(0.3)


def _draw(answers: list[dict], tty: bool, first: bool, footer: str, notes: dict) -> None:
    jw = max(len(a["jid"]) for a in answers)
    lines = [f"{a['jid']:<{jw}} " + render(a, 16) for a in answers]
    width = max(len(line) for line in lines)
    lines = [f"{line:<{width}}  {notes.get(a['jid'], '')}".rstrip()
             for a, line in zip(answers, lines)]
    if tty:
        cols = shutil.get_terminal_size((100, 20)).columns
        lines = [line[: cols - 1] for line in lines]  # a wrapped line would break the redraw
        if not first:
            sys.stdout.write(f"\033[{len(lines) + 1}F")
        for a, line in zip(answers, lines):
            sys.stdout.write("\033[K" + click.style(line, fg=COLORS[a["state"]]) + "\n")
        sys.stdout.write("\033[K" + click.style(footer, dim=True) + "\n")
        sys.stdout.flush()
    else:
        for line in lines:
            click.echo(line)
        click.echo(footer + "\n")


def run_demo(app, jobs: int = 6, seed: int = 7) -> None:
    base = app.settings
    settings = Settings(redis_url=base.redis_url, data_dir=base.data_dir,
                        prefix=f"{base.prefix}-demo", ttl=base.ttl)
    with redis_errors(settings):  # a fresh demo each run: its own prefix, emptied first
        client = create_client(settings)
        for pattern in (f"{{{settings.prefix}:*", f"{settings.prefix}:*"):
            stale = list(client.scan_iter(match=pattern, count=1000))
            if stale:
                client.delete(*stale)
    d = Deployment.open(settings, client=client)
    tracker, pub = Tracker(d), Publisher(d)
    rng = random.Random(seed)
    stamp = time.strftime("%H%M%S")
    jids = [f"{PLANS[i % len(PLANS)][0]}-{stamp}-{i}" for i in range(jobs)]
    click.echo(f"tracker demo on {settings.where()} (prefix {settings.prefix!r}): "
               f"{jobs} jobs, a projector, live TRACK GET")
    plans = {jid: PLANS[i % len(PLANS)] for i, jid in enumerate(jids)}
    untracked = [jid for jid, plan in plans.items() if not plan[1]]
    retried = [jid for jid, plan in plans.items() if plan[1] and plan[2]]
    notes = {jid: UNTRACKED for jid in untracked}
    if untracked:
        click.echo(f"- {_names(untracked)} {'is' if len(untracked) == 1 else 'are'} pushed "
                   f'without "track": 1 in custom, so TRACK GET answers unknown (untracked)')
    if retried:
        click.echo(f"- {_names(retried)} fail{'s' if len(retried) == 1 else ''} and "
                   f"{'is' if len(retried) == 1 else 'are'} retried: a retry starts its progress "
                   "again at 0%")
    click.echo()

    projector = Projector(d, consumer="demo")
    folding = threading.Thread(target=projector.run, kwargs={"report_every": 3600}, daemon=True)
    folding.start()
    stop = threading.Event()
    workers = [threading.Thread(target=_job, daemon=True,
                                args=(pub, tracker, jid, PLANS[i % len(PLANS)],
                                      random.Random(rng.random()), stop, notes))
               for i, jid in enumerate(jids)]
    for w in workers:
        w.start()
    tty = sys.stdout.isatty()
    first, last_print = True, 0.0

    def footer() -> str:
        t = projector.totals
        return f"projector: {t.folded} events folded in {t.batches} atomic batches"

    try:
        while any(w.is_alive() for w in workers):
            if tty or time.monotonic() - last_print > 1.0:
                _draw(tracker.get_many(jids), tty, first, footer(), notes)
                first, last_print = False, time.monotonic()
            time.sleep(0.1)
        time.sleep(0.3)  # let the projector fold the last events
        _draw(tracker.get_many(jids), tty, first, footer(), notes)
    finally:
        stop.set()
        projector.stop()
        folding.join(timeout=5)
    click.echo("\nFinal TRACK GET answers:")
    for answer in tracker.get_many(jids):
        echo_json(answer)
    click.echo()
    if untracked:
        click.echo(f"{_names(untracked)} answer{'s' if len(untracked) == 1 else ''} 'unknown': "
                   f'{"it was" if len(untracked) == 1 else "they were"} pushed without '
                   '"track": 1, and only tracked jobs have a track.')
    if retried:
        click.echo(f"{_names(retried)} went back to 0%: a failed attempt was retried, and the "
                   "retry reports its progress from the start.")
    example = retried[0] if retried else jids[0]
    click.echo(f"The log keeps every event; try:\n"
               f"  tracker --prefix {settings.prefix} history {example}\n"
               f"  tracker --prefix {settings.prefix} replay --verify")


def _names(jids: list[str]) -> str:
    return jids[0] if len(jids) == 1 else ", ".join(jids[:-1]) + " and " + jids[-1]


@cli.command()
@click.option("--jobs", type=click.IntRange(1, 50), default=6, show_default=True)
@pass_app
def demo(app, jobs):
    """Simulate a job server and workers, project live and show the tracks move."""
    run_demo(app, jobs)
