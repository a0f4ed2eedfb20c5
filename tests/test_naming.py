"""Names are DNS labels matched whole: no trailing newline slips through."""

import pytest

from usher.errors import InvalidRequest
from usher.naming import check_label, check_short_name, check_user, qualify


@pytest.mark.parametrize("label", ["abc\n", "a\nb", "-a", "a-", "A", "", "a" * 64, None, 7])
def test_bad_labels_are_refused(label):
    with pytest.raises(InvalidRequest):
        check_label(label)


@pytest.mark.parametrize("user", ["bob\n", "Bob", "", "1bob", "b" * 33, None])
def test_bad_user_names_are_refused(user):
    with pytest.raises(InvalidRequest):
        check_user(user)


def test_a_label_inside_a_name_cannot_end_in_a_newline():
    with pytest.raises(InvalidRequest):
        check_short_name("web\n.prod")
    with pytest.raises(InvalidRequest):
        qualify("web\n.prod", "alice", "usher.test")
    assert qualify(" Web1.Prod ", "alice", "usher.test") == "web1.prod.alice.usher.test"
