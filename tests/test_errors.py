"""collector.errors: the hierarchy's messages never carry a registered secret."""

from __future__ import annotations

from collector.errors import RequestRejected, SinkPermanentError, SinkTransientError
from collector.log import register_secrets, register_token


def test_api_error_messages_pass_the_redactor() -> None:
    """A secret or token that reached an API error's message is masked in it and its reason."""
    register_token("acme", "errors-test-token-77aa")
    error = RequestRejected("server said errors-test-token-77aa", tenant="acme", status=403)
    assert str(error) == "server said ***"
    assert error.reason == "RequestRejected: HTTP 403: server said ***"


def test_sink_error_messages_pass_the_redactor() -> None:
    """Sink errors (a receiver's echoed body) lose registered secrets too; retry_after stays."""
    register_secrets(["errors-test-hook-header-88bb"])
    permanent = SinkPermanentError("HTTP 400: X-Token: errors-test-hook-header-88bb")
    transient = SinkTransientError("echo errors-test-hook-header-88bb", retry_after=3.0)
    assert str(permanent) == "HTTP 400: X-Token: ***"
    assert (str(transient), transient.retry_after) == ("echo ***", 3.0)
