"""Dramatiq: ``broker.add_middleware(Tracking())``, then ``@dramatiq.actor(track=True)``.

Add the middleware before declaring actors (Dramatiq checks actor options against
the broker's middleware). Opt in per actor with ``track=True``, or per message with
``actor.send_with_options(args=..., track=True)``. The JID is the message id.

Hooks and what they publish:

* ``before_enqueue`` (a send, or a delayed message reaching its queue): ``enqueued``;
* ``before_enqueue`` of a retry into the delay queue (``Retries``): ``failed``; a retry
  follows after the backoff, and ``enqueued`` comes when it is due;
* ``before_process_message``: ``working``, reserved for the actor's ``time_limit``;
* ``after_process_message`` without an exception: ``success``;
* ``after_nack``, the message going to the dead-letter queue (retries exhausted,
  ``throws``, skipped as failed): ``dead``;
* ``after_process_message`` with an exception and no ``Retries`` middleware: ``dead``
  (Dramatiq acks it; nothing follows);
* ``after_skip_message`` of a message not failed (acked, never run): ``dead``.

The hooks follow ``Retries``' own decision (it either re-enqueues the message or
fails it), so ``max_retries``, ``retry_when`` and ``throws`` are honoured as they are.
"""

from __future__ import annotations

import threading
from typing import Any, Optional

from dramatiq.common import q_name
from dramatiq.middleware import Middleware
from dramatiq.middleware.retries import Retries
from dramatiq.middleware.time_limit import TimeLimit

from tracker.integrations import context
from tracker.integrations.base import error_fields, publisher_for

_MAX_PENDING = 10_000


def _truthy(value: Any) -> bool:
    return value is True or (type(value) is int and value == 1)


class Tracking(Middleware):
    """Publishes the lifecycle of tracked messages. ``tracker``: a ``Tracker``, else one
    from the environment, connected in each worker process on first use."""

    def __init__(self, tracker=None):
        self.tracking = publisher_for(tracker)
        self._errors: dict[str, tuple[str, str]] = {}  # message id -> the attempt's error
        self._local = threading.local()

    @property
    def actor_options(self) -> set:
        return {"track"}

    # -------------------------------------------------------------------- helpers
    @staticmethod
    def _actor(broker, message):
        try:
            return broker.get_actor(message.actor_name)
        except Exception:  # ActorNotFound: a message for an actor this process lacks
            return None

    def _track(self, broker, message) -> Any:
        value = message.options.get("track")
        if value is None:
            actor = self._actor(broker, message)
            value = actor.options.get("track") if actor is not None else None
        return value if _truthy(value) else None

    def _time_limit(self, broker, message) -> Optional[float]:
        ms = message.options.get("time_limit")
        if ms is None:
            actor = self._actor(broker, message)
            ms = actor.options.get("time_limit") if actor is not None else None
        if ms is None:
            ms = next((m.time_limit for m in broker.middleware if isinstance(m, TimeLimit)), None)
        return ms / 1000 if ms else None

    def _fields(self, broker, message) -> dict:
        return dict(queue=q_name(message.queue_name), jobtype=message.actor_name,
                    reserve_for=self._time_limit(broker, message))

    def _error(self, message) -> tuple[str, str]:
        err = self._errors.pop(message.message_id, None)
        if err is not None:
            return err
        exc = getattr(message, "_exception", None)  # MessageProxy keeps the attempt's error
        if exc is not None:
            return error_fields(exc)
        tb = (message.options.get("traceback") or "").strip().splitlines()
        if tb and ":" in tb[-1]:
            name, _, text = tb[-1].partition(":")
            return name.strip().rsplit(".", 1)[-1], text.strip()
        return "Error", ""

    # ---------------------------------------------------------------------- hooks
    def before_enqueue(self, broker, message, delay):
        # Before, not after: once the message is in Redis a worker may start it, and its
        # ``working`` must not reach the log ahead of this ``enqueued``.
        track = self._track(broker, message)
        if track is None:
            return
        retrying = message.queue_name.endswith(".DQ") and message.options.get("retries", 0) > 0
        if retrying:
            errtype, text = self._error(message)
            self.tracking.failed(message.message_id, errtype, text)
        else:
            self.tracking.enqueued(message.message_id, track=track,
                                   **self._fields(broker, message))

    def before_process_message(self, broker, message):
        track = self._track(broker, message)
        self._local.token = context.enter(message.message_id, track is not None, self.tracking)
        if track is not None:
            self.tracking.working(message.message_id,
                                  reserve_for=self._time_limit(broker, message))

    def _leave(self) -> None:
        token = getattr(self._local, "token", None)
        if token is not None:
            self._local.token = None
            context.leave(token)

    def after_process_message(self, broker, message, *, result=None, exception=None):
        self._leave()
        if self._track(broker, message) is None:
            return
        if exception is None:
            self.tracking.success(message.message_id)
            return
        if not any(isinstance(m, Retries) for m in broker.middleware):
            self.tracking.dead(message.message_id, *error_fields(exception))
            return
        if len(self._errors) > _MAX_PENDING:  # outcomes that never came (should not happen)
            self._errors.clear()
        self._errors[message.message_id] = error_fields(exception)  # Retries decides next

    def after_skip_message(self, broker, message):
        self._leave()
        if not message.failed and self._track(broker, message) is not None:
            self.tracking.dead(message.message_id, "SkipMessage", "skipped; it will not run")

    def before_worker_shutdown(self, broker, worker):
        self.tracking.flush()

    def after_nack(self, broker, message):
        if self._track(broker, message) is not None:
            errtype, text = self._error(message)
            self.tracking.dead(message.message_id, errtype, text)
