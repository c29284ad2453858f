"""The object every ``tracker`` command receives, in its own module so that
command modules (cli_replay, cli_dlq) and ``tracker.cli`` can all import it
without importing each other."""

from __future__ import annotations

from typing import Optional

import click

from tracker.config import Deployment, Settings


class App:
    """What every command needs; the deployment is opened on first use."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._deployment: Optional[Deployment] = None
        self.verbose = 0

    @property
    def deployment(self) -> Deployment:
        if self._deployment is None:
            self._deployment = Deployment.open(self.settings)
        return self._deployment

    @property
    def tracker(self):
        from tracker.query import Tracker

        return Tracker(self.deployment)


pass_app = click.make_pass_decorator(App)
