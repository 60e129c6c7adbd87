"""Each API variant of the corpus (tests/api_variants/), served by the simulator's switch and run
through the collector's parsing: accepted with the expected records, or rejected at its path."""

from __future__ import annotations

import datetime as dt
import gzip

import pytest

from collector.errors import BadResponse
from collector.models import tenant_day_from_body
from collector.simulator import VARIANTS, SimTenant, Simulator, SimulatorSettings
from tests.variant_corpus import Variant, corpus

CORPUS = corpus()
FETCHED = dt.datetime(2026, 3, 10, 6, 0, tzinfo=dt.UTC)


def _served(case: Variant) -> tuple[int, bytes, str]:
    """The status, decoded body and content type the simulator serves for the case's day."""
    tenant = SimTenant("acme", "acme-client", "acme-secret", users=case.users, variant=case.variant)
    sim = Simulator(SimulatorSettings(tenants=[tenant], today=case.day + dt.timedelta(days=7)))
    answer = sim.answer_day("acme", case.day)
    body = answer.body
    if answer.content_encoding == "gzip":
        body = gzip.decompress(body)
    return answer.status, body, answer.content_type


@pytest.mark.parametrize("case", CORPUS, ids=[case.name for case in CORPUS])
def test_variant_outcome(case: Variant) -> None:
    """The variant's body parses into exactly the expected records, or fails as expected."""
    status, body, _ = _served(case)
    if case.outcome == "server_error":
        assert status == case.expect["status"]
        return
    assert status == 200
    if "body_bytes" in case.expect:
        low, high = case.expect["body_bytes"]
        assert low <= len(body) <= high
    if case.outcome == "accepted":
        td = tenant_day_from_body("acme", case.day, body, fetched_at=FETCHED, final=True)
        case.check_accepted(td)
    else:
        assert case.outcome == "bad_response"
        with pytest.raises(BadResponse) as caught:
            tenant_day_from_body("acme", case.day, body, fetched_at=FETCHED, final=True)
        case.check_reason(str(caught.value))


def test_every_simulator_variant_has_a_corpus_file() -> None:
    """No switch of the simulator goes untested: each variant is used by some corpus file."""
    assert {case.variant for case in CORPUS} == set(VARIANTS)


def test_gzip_variant_is_compressed_on_the_wire() -> None:
    """The gzip variant really sends a gzip body with its Content-Encoding."""
    tenant = SimTenant("acme", "acme-client", "acme-secret", users=6, variant="gzip")
    sim = Simulator(SimulatorSettings(tenants=[tenant], today=dt.date(2026, 3, 10)))
    answer = sim.answer_day("acme", dt.date(2026, 3, 3))
    assert (answer.content_encoding, answer.body[:2]) == ("gzip", b"\x1f\x8b")
