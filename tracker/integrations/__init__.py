"""Integrations with Python job queues: Celery, RQ and Dramatiq.

Each submodule imports its library, so ``import tracker`` never does; install the
extra you need (``pip install 'tracker[celery]'``, ``[rq]``, ``[dramatiq]``).
``tracker.progress()`` and ``tracker.current_jid()`` (from ``context``) work in
the task code of all three.
"""
