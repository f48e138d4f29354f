"""The Redis URL forms every process takes: plain, and Sentinel (parsed here; followed live in the fault suite)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from broker.connection import sentinel_target
from broker.settings import Settings


def test_sentinel_urls():
    t = sentinel_target("redis+sentinel://:pw@10.0.0.1:26379,[::1]:26380,sentinel-c/redserve-ha/2?sentinel_password=s")
    assert t is not None
    assert t.sentinels == [("10.0.0.1", 26379), ("::1", 26380), ("sentinel-c", 26379)]
    assert (t.master, t.db, t.password, t.tls) == ("redserve-ha", 2, "pw", False)
    assert t.sentinel_kwargs["password"] == "s"
    assert sentinel_target("rediss+sentinel://h:1/m").tls  # type: ignore[union-attr]
    assert sentinel_target("redis://127.0.0.1:6379/0") is None


@pytest.mark.parametrize("url", ["redis+sentinel://h:1", "redis+sentinel://h:port/m", "redis+sentinel://h:1/m/db"])
def test_a_bad_sentinel_url_is_a_settings_error(url):
    with pytest.raises(ValidationError, match="the form is"):
        Settings(redis_url=url)
