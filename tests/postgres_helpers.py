"""A fresh PostgreSQL schema per test, in the database COLLECTOR_TEST_POSTGRES_URL names."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Iterator

import sqlalchemy


@contextlib.contextmanager
def fresh_schema(postgres_url: str, prefix: str = "t") -> Iterator[tuple[str, str]]:
    """A new, empty schema: (its name, a URL whose connections use it); dropped afterwards."""
    base = sqlalchemy.make_url(postgres_url)
    schema = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sqlalchemy.create_engine(base)
    try:
        with admin.begin() as conn:
            conn.exec_driver_sql(f"CREATE SCHEMA {schema}")
        url = base.update_query_dict({"options": f"-csearch_path={schema}"})
        yield schema, url.render_as_string(hide_password=False)
        with admin.begin() as conn:
            conn.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        admin.dispose()
