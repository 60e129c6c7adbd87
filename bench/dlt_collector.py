"""The same job done idiomatically with dlt: RESTClient + OAuth2 client credentials, SQLite.

One ``RESTClient`` per tenant with dlt's ``OAuth2ClientCredentials`` (subclassed only to send the
JSON body the vendor docs show), a resource listing (tenant, day) pairs and a
``parallelized=True`` transformer fetching each day in dlt's extract thread pool. The rows land in
SQLite through dlt's ``sqlalchemy`` destination with ``merge`` on (tenant, day), so a re-run
replaces rather than duplicates, as a user would want. dlt unpacks the nested lists into its child
tables (``usage_daily__users``, ``usage_daily__ides``, ``usage_daily__languages``).

Extract parallelism is dlt's default (5 workers, 20 items in flight) unless ``--workers`` says
otherwise. Needs ``pip install dlt`` (and SQLAlchemy, which the collector already installs).

    python bench/dlt_collector.py --base-url URL --token-url URL --tenants-file T.json \\
        --since 2025-09-01 --until 2025-09-30 --db out.db --pipelines-dir DIR
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--token-url", required=True)
    parser.add_argument("--tenants-file", required=True, help="JSON list of id/client_id/secret")
    parser.add_argument("--since", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--until", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--db", required=True)
    parser.add_argument("--pipelines-dir", required=True)
    parser.add_argument("--workers", type=int, default=None, help="dlt extract workers")
    args = parser.parse_args(argv)

    # dlt reads its settings from the environment; these must be set before it is imported.
    os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")
    if args.workers is not None:
        os.environ["EXTRACT__WORKERS"] = str(args.workers)
        os.environ["EXTRACT__MAX_PARALLEL_ITEMS"] = str(max(20, 2 * args.workers))

    import dlt
    from dlt.sources.helpers.rest_client.auth import OAuth2ClientCredentials
    from dlt.sources.helpers.rest_client.client import RESTClient

    class ZencoderOAuth(OAuth2ClientCredentials):
        """dlt's client-credentials flow with the JSON body of the vendor docs."""

        def build_access_token_request(self) -> dict[str, Any]:
            return {
                "json": {
                    "client_id": self.client_id,
                    "client_secret": self.client_secret,
                    "grant_type": "client_credentials",
                }
            }

    tenants = json.loads(Path(args.tenants_file).read_text())
    days = [
        (args.since + dt.timedelta(days=i)).isoformat()
        for i in range((args.until - args.since).days + 1)
    ]
    clients = {
        t["id"]: RESTClient(
            base_url=args.base_url,
            auth=ZencoderOAuth(
                access_token_url=args.token_url,
                client_id=t["client_id"],
                client_secret=t["client_secret"],
            ),
        )
        for t in tenants
    }

    @dlt.resource(selected=False)
    def tenant_days() -> Iterator[dict[str, str]]:
        for tenant in tenants:
            for day in days:
                yield {"tenant": tenant["id"], "day": day}

    @dlt.transformer(
        data_from=tenant_days,
        name="usage_daily",
        write_disposition="merge",
        primary_key=("tenant", "day"),
        parallelized=True,
    )
    def usage_daily(item: dict[str, str]) -> dict[str, Any]:
        response = clients[item["tenant"]].get("/api/v1/data/usage", params={"day": item["day"]})
        data = response.json()["data"]
        daily = data["daily"][0] if data["daily"] else {}
        return {
            "tenant": item["tenant"],
            "day": item["day"],
            "active_users": daily.get("active_users", 0),
            "messages": daily.get("messages", 0),
            "ides": daily.get("ides", []),
            "languages": daily.get("languages", []),
            "users": data["users"],
        }

    pipeline = dlt.pipeline(
        pipeline_name="zencoder_usage",
        pipelines_dir=args.pipelines_dir,
        destination=dlt.destinations.sqlalchemy(credentials=f"sqlite:///{args.db}"),
        dataset_name="main",
    )
    info = pipeline.run(usage_daily)
    info.raise_on_failed_jobs()
    return 0


if __name__ == "__main__":
    sys.exit(main())
