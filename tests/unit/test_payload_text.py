"""A client's payload is written as JSON text for its jsonb column (standard_json, as its
size is measured): whatever JSON allows must come back as sent, including what the fast
encoder refuses."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from queue_service.core.validation import standard_json

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def test_integers_past_64_bits_are_kept() -> None:
    document = {"account": 2**70, "balance": -(2**65), "note": "é"}
    assert json.loads(standard_json(document)) == document


@given(_JSON)
def test_any_json_document_parses_back_as_sent(document: Any) -> None:
    assert json.loads(standard_json(document)) == document
