"""``tracker web``: the HTTP API, SSE, the page and /metrics (the ``web`` extra)."""

from __future__ import annotations

import click

from tracker.cli.app import cli, pass_app
from tracker.server import web


@cli.command("web")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="0 picks a free port (printed on stderr).")
@click.option("--token", envvar="TRACKER_WEB_TOKEN", show_envvar=True, metavar="TOKEN",
              help="Bearer token for POST (and reads, with --reads-need-token). Without one, "
                   "writes are off. Prefer the environment: it keeps the token out of `ps`.")
@click.option("--reads-need-token/--open-reads", envvar="TRACKER_WEB_READS_NEED_TOKEN",
              show_envvar=True, default=False, show_default=True,
              help="Whether GETs of /v1 and /metrics need the token too.")
@click.option("--cors-origin", "cors_origins", multiple=True, envvar="TRACKER_WEB_CORS_ORIGINS",
              show_envvar=True, metavar="ORIGIN",
              help="Allow browsers on this origin (repeat; * for any). Default: CORS off.")
@click.option("--max-body", type=click.IntRange(64, 64 * 1024 * 1024), default=16 * 1024,
              show_default=True, metavar="BYTES", help="Largest request body; larger gets 413.")
@click.option("--ready-max-lag", type=click.FloatRange(0.001), default=60.0, show_default=True,
              metavar="SECONDS", help="Projector lag above which /readyz answers 503.")
@pass_app
def web_(app, host, port, token, reads_need_token, cors_origins, max_body, ready_max_lag):
    """Serve the HTTP API, live progress (SSE), the page at / and Prometheus /metrics."""
    config = web.load("config").WebConfig(
        host=host, port=port, token=token or None, reads_need_token=reads_need_token,
        cors_origins=tuple(o for v in cors_origins for o in v.split(",") if o),
        max_body=max_body, ready_max_lag=ready_max_lag).validate()
    web.load("serve").run(app.settings, config)
