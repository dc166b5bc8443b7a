"""What Caddy answers by itself: the body cap in the proxy's unit, and its own errors in the proxy's
JSON shape (issue 12). (A body over the cap is refused while the client still sends it, so a client
sees a reset before it could read the 413: its JSON shape is Caddy's handle_errors, as the 502's.)"""

from __future__ import annotations

import pytest

from unit_helpers import assert_error  # the error-shape check the unit suite uses, for any response
from wire import wait_until

CAP_MIB = 50  # DCE_MAX_BODY_MB, the default


def test_a_body_under_the_cap_in_mib_reaches_the_proxy(stack, session):
    # Over 50 * 10^6 bytes but under 50 MiB: Caddy used to refuse it while the proxy would take it.
    body = b"x" * (CAP_MIB * 1_000_000 + 1000)
    response = session.post(f"{stack.base}/k/{stack.key}/v1/chat/completions", data=body,
                            headers={"Content-Type": "application/json"}, timeout=120)
    # The proxy read it all, and found it is not JSON.
    assert assert_error(response, 400)["code"] == "invalid_json"


@pytest.mark.disruptive
def test_the_proxy_down_is_a_json_502_with_retry_after(stack, session):
    proxy = stack.container("proxy")
    proxy.stop(timeout=5)
    try:
        response = session.get(f"{stack.base}/v1/models", headers={"Authorization": f"Bearer {stack.key}"},
                               timeout=60)
        assert assert_error(response, 502)["code"] == "proxy_unavailable"
        assert int(response.headers["Retry-After"]) > 0
    finally:
        proxy.start()
        wait_until(stack.ready, 120, "the proxy to serve again", interval=1)
