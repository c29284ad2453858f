"""``tracker watch``: a live progress line for one job, until it finishes."""

from __future__ import annotations

import shutil
import sys
import time

import click

from tracker.cli.app import cli, pass_app

TERMINAL = ("success", "failed", "dead", "unknown")
COLORS = {"enqueued": "blue", "working": "yellow", "success": "green", "failed": "red",
          "dead": "red", "unknown": "white"}


def render(answer: dict, width: int = 30) -> str:
    pct = answer.get("percent")
    filled = 0 if pct is None else round(width * pct / 100)
    bar = "#" * filled + "-" * (width - filled)
    pct_text = "  ?%" if pct is None else f"{pct:>3}%"
    return f"[{bar}] {pct_text} {answer['state']:<8} {answer.get('desc', '')}"


def follow(tracker, jid: str, interval: float = 0.5) -> str:
    """Poll the track, redraw on change; return the final state."""
    tty = sys.stdout.isatty()
    last = None
    while True:
        answer = tracker.get(jid)
        shown = (answer["state"], answer.get("percent"), answer.get("desc"))
        if shown != last:
            line = render(answer)
            if tty:
                cols = shutil.get_terminal_size((80, 20)).columns
                click.echo("\r\033[K" + click.style(line[: cols - 1], fg=COLORS[answer["state"]]),
                           nl=False)
            else:
                click.echo(line)
            last = shown
        if answer["state"] in TERMINAL:
            if tty:
                click.echo()
            return answer["state"]
        time.sleep(interval)


_EXIT = {"success": 0, "failed": 3, "dead": 3, "unknown": 4}


@cli.command()
@click.argument("jid")
@click.option("--interval", type=click.FloatRange(0.05, 60), default=0.5, show_default=True,
              help="Seconds between polls.")
@pass_app
def watch(app, jid, interval):
    """Follow a job's track live until it finishes.

    Exit status: 0 success, 3 failed or dead, 4 unknown (untracked or expired).
    """
    sys.exit(_EXIT[follow(app.tracker, jid, interval)])
