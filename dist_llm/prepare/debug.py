"""Test-only fault injection for the prepare pipeline, kept out of the production path.

The driver calls a :class:`PrepareHooks` object at its checkpoints (a new part written in
phase A, a new shard in phase C); production runs get the no-op hooks. ``debug.stop_after_parts``
/ ``debug.stop_after_shards`` (conf/prepare.yaml) select :class:`StopAfter`, which simulates a
crash so tests can check that a resumed run equals an uninterrupted one.
"""
from __future__ import annotations

from dist_llm.config.prepare_schema import PrepareDebugConfig


class Interrupted(RuntimeError):
    """A simulated crash (``debug.stop_after_parts`` / ``debug.stop_after_shards``)."""


class PrepareHooks:
    """Checkpoints of a run; the default does nothing."""

    def after_part(self, new_parts: int) -> None:
        """Called after each part this run wrote (``new_parts`` so far)."""

    def after_shard(self, new_shards: int) -> None:
        """Called after each shard this run wrote (``new_shards`` so far)."""


class StopAfter(PrepareHooks):
    """Raise :class:`Interrupted` after ``parts`` new parts or ``shards`` new shards (0 = never)."""

    def __init__(self, parts: int, shards: int) -> None:
        self.parts, self.shards = parts, shards

    def after_part(self, new_parts: int) -> None:
        if self.parts and new_parts >= self.parts:
            raise Interrupted(f"stopped after {new_parts} parts")

    def after_shard(self, new_shards: int) -> None:
        if self.shards and new_shards >= self.shards:
            raise Interrupted(f"stopped after {new_shards} shards")


def hooks_for(debug: PrepareDebugConfig) -> PrepareHooks:
    if debug.stop_after_parts or debug.stop_after_shards:
        return StopAfter(debug.stop_after_parts, debug.stop_after_shards)
    return PrepareHooks()
