"""Hypothesis strategies for registry names, references and request targets."""

from __future__ import annotations

from hypothesis import strategies as st

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"

component = st.builds(
    lambda first, rest: first + "".join(sep + part for sep, part in rest),
    st.text(_ALNUM, min_size=1, max_size=8),
    st.lists(
        st.tuples(
            st.sampled_from([".", "_", "__", "-", "--"]), st.text(_ALNUM, min_size=1, max_size=6)
        ),
        max_size=2,
    ),
)
names = st.lists(component, min_size=1, max_size=4).map("/".join).filter(lambda n: len(n) <= 255)
tags = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: f"sha256:{h}")
