"""``--redis-url`` accepts the cluster and Sentinel forms ``redis_connect`` opens (issue 12)."""

from __future__ import annotations

import pytest

from trio_portfolio.config import Settings, mask_url


@pytest.mark.parametrize(
    "url",
    [
        "redis+cluster://127.0.0.1:7000,127.0.0.1:7001",
        "rediss+cluster://user:secret@10.0.0.1:7000",
        "redis+sentinel://127.0.0.1:26379,127.0.0.1:26380/portfolio",
        "rediss+sentinel://127.0.0.1:26379/portfolio/2",
    ],
)
def test_cluster_and_sentinel_urls_are_accepted(url: str) -> None:
    assert Settings(redis_url=url).redis_url == url


def test_other_schemes_are_still_refused_with_the_forms_named() -> None:
    with pytest.raises(ValueError, match=r"redis\[s\]\+cluster://"):
        Settings(redis_url="http+cluster://127.0.0.1:7000")


def test_a_cluster_url_password_is_masked() -> None:
    masked = mask_url("redis+cluster://user:secret@127.0.0.1:7000,127.0.0.1:7001")
    assert "secret" not in masked
    assert masked == "redis+cluster://user:***@127.0.0.1:7000,127.0.0.1:7001"
