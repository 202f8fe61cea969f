"""The analysis id is minted and recognised in one place (pure, no I/O)."""

from __future__ import annotations

import pytest

from trio_portfolio.analysis_outcome import AnalysisId


def test_a_minted_id_belongs_to_its_connection_only() -> None:
    ids = {AnalysisId.mint("c0ffee") for _ in range(100)}
    assert len(ids) == 100  # unique per attempt
    for analysis_id in ids:
        assert isinstance(analysis_id, str)
        assert analysis_id.belongs_to("c0ffee")
        assert not analysis_id.belongs_to("c0ffe")  # a prefix of the owner is not the owner
        assert not analysis_id.belongs_to("c0ffee0")
        assert not analysis_id.belongs_to("")


def test_an_id_heard_from_elsewhere_is_recognised_by_its_owner() -> None:
    minted = AnalysisId.mint("abc123")
    heard = AnalysisId.of(str(minted))  # as parsed from a session event
    assert heard == minted
    assert type(str(minted)) is str
    assert heard.belongs_to("abc123")
    assert AnalysisId.of(minted) is minted
    for foreign in ("", "abc123", "abc1234-00000000", "other-abc123-1"):
        assert not AnalysisId.of(foreign).belongs_to("abc123"), foreign


@pytest.mark.parametrize("connection_id", ["", "a-b"])
def test_an_ambiguous_connection_id_is_refused(connection_id: str) -> None:
    with pytest.raises(ValueError, match="connection id"):
        AnalysisId.mint(connection_id)
