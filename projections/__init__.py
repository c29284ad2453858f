"""The folds: what an event does to a job's track. Pure: no I/O, no redis."""

from .track import Track, apply, fold, visible

__all__ = ["Track", "apply", "fold", "visible"]
