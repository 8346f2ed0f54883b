"""Postgres advisory-lock keys, one per purpose, all named here.

Two purposes sharing a key serialise each other without a word (an outcomes update once held up
every run's claim for its whole transaction), so each purpose has its own key and `unique`
refuses a copy at import time. Keys are bigint advisory locks; the publish staging lock uses the
separate two-int key space, with `PUBLISH_STAGING` as its class.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class AdvisoryLock(IntEnum):
    MIGRATE = 7_319_001  # session lock: concurrent `migrate` calls apply each migration once
    PUBLISH = 7_319_002  # transaction lock: one swap of the serving views at a time (publish, rollback)
    RUN_CLAIM = 7_319_003  # transaction lock: check for live runs and claim one, atomically
    OUTCOMES = 7_319_004  # transaction lock: one outcomes update at a time
    PUBLISH_STAGING = 7_319_005  # (class, hashtext(version)) session lock: who owns a version's staging tables
    RETRAIN_COMMAND = 7_319_006  # (class, hashtext(run key)) session lock: one `retrain` command per as-of


TRANSACTION_LOCK = "SELECT pg_advisory_xact_lock(%s)"
TRY_KEYED_SESSION_LOCK = "SELECT pg_try_advisory_lock(%s, hashtext(%s))"  # (class, text key); ends with the session
