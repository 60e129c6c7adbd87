"""The collector a user would write from the vendor docs: sequential ``requests`` and ``sqlite3``.

For each tenant it asks for a token (JSON body, as the docs show), then fetches every day of the
window one after the other with ``day=YYYY-MM-DD`` and inserts the rows into the same four tables
the real collector's SQLite sink has. It does the minimum a user adds after the first failures:
wait out a 429/503 Retry-After (or one second), retry a 500 up to five times, commit per tenant.
It uses one ``requests.Session`` (keep-alive), which is kinder to it than ``requests.get``.

    python bench/naive_collector.py --base-url URL --token-url URL --tenants-file T.json \\
        --since 2025-09-01 --until 2025-09-30 --db out.db
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import requests

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_daily (
    tenant TEXT, day TEXT, active_users INTEGER, messages INTEGER, fetched_at TEXT,
    PRIMARY KEY (tenant, day));
CREATE TABLE IF NOT EXISTS usage_daily_ide (
    tenant TEXT, day TEXT, ide_name TEXT, engaged_users INTEGER,
    PRIMARY KEY (tenant, day, ide_name));
CREATE TABLE IF NOT EXISTS usage_daily_language (
    tenant TEXT, day TEXT, language_name TEXT, engaged_users INTEGER,
    PRIMARY KEY (tenant, day, language_name));
CREATE TABLE IF NOT EXISTS usage_user_daily (
    tenant TEXT, day TEXT, user TEXT, messages INTEGER, last_active TEXT, ides TEXT,
    languages TEXT, PRIMARY KEY (tenant, day, user));
"""


def get_token(session: requests.Session, token_url: str, tenant: dict[str, str]) -> str:
    response = session.post(
        token_url,
        json={
            "client_id": tenant["client_id"],
            "client_secret": tenant["client_secret"],
            "grant_type": "client_credentials",
        },
        timeout=30,
    )
    response.raise_for_status()
    return str(response.json()["access_token"])


def get_day(session: requests.Session, url: str, token: str, day: str) -> dict[str, Any]:
    for _ in range(10):
        response = session.get(
            url, params={"day": day}, headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        if response.status_code in (429, 503):
            try:
                wait = float(response.headers.get("Retry-After", "1"))
            except ValueError:
                wait = 1.0
            time.sleep(min(wait, 60.0))
            continue
        if response.status_code >= 500:
            time.sleep(1)
            continue
        response.raise_for_status()
        data: dict[str, Any] = response.json()["data"]
        return data
    raise RuntimeError(f"gave up on day {day}")


def store_day(db: sqlite3.Connection, tenant: str, day: str, data: dict[str, Any]) -> None:
    now = dt.datetime.now(dt.UTC).isoformat()
    daily: dict[str, Any] = (
        data["daily"][0] if data["daily"] else {"active_users": 0, "messages": 0}
    )
    db.execute(
        "INSERT OR REPLACE INTO usage_daily VALUES (?, ?, ?, ?, ?)",
        (tenant, day, daily["active_users"], daily["messages"], now),
    )
    for ide in daily.get("ides", []):
        db.execute(
            "INSERT OR REPLACE INTO usage_daily_ide VALUES (?, ?, ?, ?)",
            (tenant, day, ide["ide_name"], ide["engaged_users"]),
        )
    for lang in daily.get("languages", []):
        db.execute(
            "INSERT OR REPLACE INTO usage_daily_language VALUES (?, ?, ?, ?)",
            (tenant, day, lang["language_name"], lang["engaged_users"]),
        )
    for user in data["users"]:
        db.execute(
            "INSERT OR REPLACE INTO usage_user_daily VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                tenant,
                day,
                user["email"],
                user["messages"],
                user.get("last_active"),
                json.dumps(user["ides"]),
                json.dumps(user["languages"]),
            ),
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--tenants-file", required=True, help="JSON list of id/client_id/secret")
    parser.add_argument("--since", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--until", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--db", required=True)
    args = parser.parse_args(argv)

    tenants = json.loads(Path(args.tenants_file).read_text())
    days = [
        (args.since + dt.timedelta(days=i)).isoformat()
        for i in range((args.until - args.since).days + 1)
    ]
    url = args.base_url.rstrip("/") + "/api/v1/data/usage"
    db = sqlite3.connect(args.db)
    db.executescript(SCHEMA)
    session = requests.Session()
    for tenant in tenants:
        token = get_token(session, args.token_url, tenant)
        for day in days:
            store_day(db, tenant["id"], day, get_day(session, url, token, day))
        db.commit()
    db.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
