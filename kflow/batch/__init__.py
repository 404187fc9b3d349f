"""Batch operations: signal, cancel, terminate, suspend, resume or retry every instance a visibility query selects.

A batch is durable: its definition, the instance ids selected when it was created and the outcome
of each instance live on the compacted ``batches`` topic (:mod:`kflow.batch.log`), so a batch
whose process died is resumed where it stopped and acts on each instance at most once
(:mod:`kflow.batch.plan` says why). :class:`BatchRunner` runs one, rate-limited.
"""

from kflow.batch.log import BatchLog, BatchNotFound, BatchRecord
from kflow.batch.plan import OPERATIONS, Outcome, RateLimiter, Where, WhereError, command_id, parse_rate, parse_where
from kflow.batch.runner import BatchRunner, new_batch, runner_alive, select_from_api, select_from_state

__all__ = ["OPERATIONS", "BatchLog", "BatchNotFound", "BatchRecord", "BatchRunner", "Outcome", "RateLimiter", "Where",
           "WhereError", "command_id", "new_batch", "parse_rate", "parse_where", "runner_alive", "select_from_api",
           "select_from_state"]
