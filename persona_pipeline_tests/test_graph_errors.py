"""The Graph API error classification table (docs/rules.md, "Graph API error classes"), case by case."""

from __future__ import annotations

import pytest

from persona_pipeline.domain.graph_errors import KINDS, classify, is_retryable
from persona_pipeline.resources import instagram


@pytest.mark.parametrize("http_status, code, subcode, is_transient, kind", [
    # throttling and server trouble: retry
    (400, 1, None, False, "transient"),
    (400, 2, None, False, "transient"),
    (400, 4, None, False, "transient"),
    (400, 17, None, False, "transient"),
    (400, 32, None, False, "transient"),
    (400, 613, None, False, "transient"),
    (400, 80002, None, False, "transient"),
    (400, 100, None, True, "transient"),         # is_transient wins over a generic code
    (400, -1, 2207001, False, "transient"),      # Instagram server error
    (400, -2, 2207003, False, "transient"),      # media download timed out
    (400, -1, 2207032, False, "transient"),      # create media failed
    (400, 9007, 2207027, False, "transient"),    # container not ready yet
    (500, None, None, False, "transient"),
    (502, None, None, False, "transient"),
    (503, 100, None, False, "transient"),        # the server failed, whatever the body says
    (429, None, None, False, "transient"),
    (None, None, None, False, "transient"),      # no answer at all: connection error, timeout
    # make a new container
    (400, -2, 2207020, False, "recreate"),
    (400, -1, 2207053, False, "recreate"),
    (400, 24, 2207008, False, "recreate"),
    (400, -2, 2207020, True, "recreate"),        # the subcode decides even when marked transient
    # wait for the 24 h window
    (400, 9, 2207042, False, "window"),
    (400, 9, None, False, "window"),
    (400, None, 2207042, False, "window"),
    # spam: code 4 alone is throttling, with 2207051 it is a restriction
    (400, 4, 2207051, False, "spam"),
    (400, 4, 2207051, True, "spam"),
    (400, 368, None, False, "spam"),
    # the media itself
    (400, 36000, 2207004, False, "media"),
    (400, 36001, 2207005, False, "media"),
    (400, 36003, 2207009, False, "media"),
    (400, 36003, None, False, "media"),
    (400, 9004, 2207052, False, "media"),
    (400, 352, 2207026, False, "media"),
    (400, 100, 2207023, False, "media"),
    # the token or its permissions
    (400, 190, None, False, "auth"),
    (400, 190, 463, False, "auth"),              # expired
    (400, 190, 460, False, "auth"),              # password changed
    (400, 102, None, False, "auth"),
    (403, 10, None, False, "auth"),
    (400, 200, None, False, "auth"),
    (400, 299, None, False, "auth"),
    # everything else
    (400, 100, None, False, "permanent"),
    (400, 100, 33, False, "permanent"),          # unknown object
    (400, 36004, 2207010, False, "permanent"),   # caption too long: a person edits it
    (400, 100, 2207040, False, "permanent"),     # too many tags
    (404, None, None, False, "permanent"),
    (None, 100, None, False, "permanent"),
])
def test_classify(http_status, code, subcode, is_transient, kind):
    assert classify(http_status, code, subcode, is_transient) == kind


def test_kinds_and_retryable():
    assert KINDS == ("transient", "recreate", "window", "spam", "media", "auth", "permanent")
    assert [k for k in KINDS if is_retryable(k)] == ["transient"]


def test_client_module_reexports_classify():
    assert instagram.classify is classify
