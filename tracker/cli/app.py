"""The ``tracker`` command group, the object every command receives, and ``main``.

Command modules beside this one add their commands with ``@cli.command()``
(rq's pattern); ``tracker/cli/__init__.py`` imports them all. Errors: one line
on stderr, exit 2 for usage and validation, 1 for runtime trouble (Redis
unreachable). Passwords in URLs are never printed.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Optional

import click
import redis
from redis.exceptions import RedisClusterException

from tracker.errors import TrackerError
from tracker.query import Tracker
from tracker.store.deployment import Deployment
from tracker.store.settings import Settings, hide_password


class App:
    """What every command needs; the deployment is opened on first use."""

    def __init__(self, settings: Settings, verbose: int = 0):
        self.settings = settings
        self.verbose = verbose
        self._deployment: Optional[Deployment] = None
        self._tracker: Optional[Tracker] = None

    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            self._deployment = Deployment.open(self.settings)
        return self._deployment

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.deployment)
        return self._tracker


pass_app = click.make_pass_decorator(App)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="TRACKER_REDIS_URL", show_envvar=True, metavar="URL",
              help="redis://, rediss:// or unix:// URL (user and password allowed); a Redis "
                   "Cluster is detected, or give seeds redis://h1:7000,h2:7001 or "
                   "redis+cluster://. Default: an embedded Redis under --data-dir.")
@click.option("--data-dir", envvar="TRACKER_DATA_DIR", show_envvar=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Where the embedded Redis keeps its data. [default: ~/.local/share/tracker]")
@click.option("--prefix", envvar="TRACKER_PREFIX", show_envvar=True, default="tracker",
              show_default=True, help="Key prefix: one deployment per prefix.")
@click.option("--partitions", envvar="TRACKER_PARTITIONS", show_envvar=True, type=int,
              help="Stream partitions, fixed when a deployment is first used. "
                   "[default: 4; 64 on a Redis Cluster]")
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
                                    partitions=partitions, ttl=ttl), verbose)


def main() -> None:
    """The console entry point: run the group, map errors to one line and an exit code."""
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
    except (redis.RedisError, RedisClusterException) as e:  # missed the boundary: one line
        click.echo(f"tracker: error: Redis: {_hidden(str(e))}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


def _hidden(text: str) -> str:
    """``text`` without the password of any Redis URL this process was given."""
    urls = [os.environ.get("TRACKER_REDIS_URL")]
    urls += [a.split("=", 1)[-1] for a in sys.argv if "://" in a]
    for url in urls:
        text = hide_password(url, text)
    return text
