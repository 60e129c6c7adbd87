"""Everything a sink plugin may import: the public plugin API of zencoder-collector.

A sink plugin (first-party ones included) imports from this module and from
:mod:`collector.testing` (in its tests) only. Every other ``collector`` module is internal and may
change between releases; an import-linter contract in ``pyproject.toml`` keeps our own sinks to
this rule, so the extension path third parties use is the one our sinks prove.

::

    from collector.plugin import Batch, Sink, SinkConfig, SinkTransientError, hookimpl

What is here, by purpose:

- the sink contract: :class:`Sink`, :class:`SinkConfig`, :class:`SinkHost` (collector-wide
  settings such as ``files.shared_group``), :data:`PiiMode`, :func:`run_blocking`, and
  :data:`hookimpl` to register sink classes through ``collector_register_sinks``;
- files: owner-only (or group-shared) files and directories (:func:`ensure_private_dir`,
  :func:`create_private_file`, :func:`create_temp_file`, :func:`file_mode`, :func:`dir_mode`,
  :func:`fsync_directory`) and the spreadsheet formula guard for CSV cells
  (:func:`guard_formula`, :func:`guard_row`); the CSV partition layout shared by the csv sink,
  ``export csv`` and ``report --sink`` (:func:`csv_partition_path`, :data:`CSV_MARKER_FIRST`,
  :mod:`collector.csv_layout`);
- the records a sink receives: :class:`Batch`, :class:`TenantDay` and its four record types;
- the data model: the SQLModel table models :class:`UsageDaily`, :class:`UsageDailyIde`,
  :class:`UsageDailyLanguage`, :class:`UsageUserDaily` (:mod:`collector.tables`), their
  ``USAGE_MODELS``/``USAGE_TABLES`` and ``USAGE_COLUMNS`` (table -> column order);
- the errors a sink raises: :class:`SinkError` and its transient/permanent subclasses;
- PII helpers: :class:`Pseudonymizer` and :func:`apply_pii`, for sinks that pseudonymize on their
  own (the host already applies each sink's configured policy before ``write``);
- logging (log through ``structlog.get_logger(__name__)``, redacted by the host):
  :func:`register_secrets` (hide a sink's own secret strings, such as a token in its URL) and
  :func:`scrub` (text from a remote server, made safe to put in an error);
- retries inside a write (a sink with its own HTTP calls): :class:`RetryPolicy`, :func:`sleep`
  and :func:`waits_disabled` (the testing switch that makes waits zero);
- SQL helpers for sinks writing through SQLAlchemy: :class:`Codec` (one UTC/ISO rule for every
  dialect), :class:`Prepared` and :class:`BulkInsert` (statements compiled once, executed many
  times), :class:`KeyLookup` and :data:`KEYS` (which (tenant, day) keys a table holds) and
  :func:`insert_for` (the dialect's upsert-capable ``insert``).
"""

from __future__ import annotations

from collector.csv_layout import MARKER_FIRST as CSV_MARKER_FIRST
from collector.csv_layout import partition_path as csv_partition_path
from collector.errors import SinkError, SinkPermanentError, SinkTransientError
from collector.files import (
    create_private_file,
    create_temp_file,
    dir_mode,
    ensure_private_dir,
    file_mode,
    fsync_directory,
    guard_formula,
    guard_row,
)
from collector.hookspecs import hookimpl
from collector.log import register_secrets, scrub
from collector.models import (
    Batch,
    DailyRecord,
    IdeRecord,
    LanguageRecord,
    TenantDay,
    UserDayRecord,
)
from collector.pii import Pseudonymizer, apply_pii
from collector.retry import RetryPolicy, sleep, waits_disabled
from collector.sink import PiiMode, Sink, SinkConfig, SinkHost, run_blocking
from collector.store.prepared import KEYS, BulkInsert, Codec, KeyLookup, Prepared
from collector.store.schema import insert_for
from collector.tables import (
    USAGE_COLUMNS,
    USAGE_MODELS,
    USAGE_TABLES,
    UsageDaily,
    UsageDailyIde,
    UsageDailyLanguage,
    UsageUserDaily,
)

__all__ = [
    "CSV_MARKER_FIRST",
    "KEYS",
    "USAGE_COLUMNS",
    "USAGE_MODELS",
    "USAGE_TABLES",
    "Batch",
    "BulkInsert",
    "Codec",
    "DailyRecord",
    "IdeRecord",
    "KeyLookup",
    "LanguageRecord",
    "PiiMode",
    "Prepared",
    "Pseudonymizer",
    "RetryPolicy",
    "Sink",
    "SinkConfig",
    "SinkError",
    "SinkHost",
    "SinkPermanentError",
    "SinkTransientError",
    "TenantDay",
    "UsageDaily",
    "UsageDailyIde",
    "UsageDailyLanguage",
    "UsageUserDaily",
    "UserDayRecord",
    "apply_pii",
    "create_private_file",
    "create_temp_file",
    "csv_partition_path",
    "dir_mode",
    "ensure_private_dir",
    "file_mode",
    "fsync_directory",
    "guard_formula",
    "guard_row",
    "hookimpl",
    "insert_for",
    "register_secrets",
    "run_blocking",
    "scrub",
    "sleep",
    "waits_disabled",
]
