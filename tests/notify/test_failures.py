from datetime import timedelta

import pytest

from notify.resilience.failures import FailureKind, failure_from_status, retry_delay


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (None, FailureKind.TRANSIENT),
        (500, FailureKind.TRANSIENT),
        (503, FailureKind.TRANSIENT),
        (429, FailureKind.TRANSIENT),
        (401, FailureKind.TRANSIENT),  # our credentials: fix, then replay the dead letters
        (422, FailureKind.PERMANENT),
        (400, FailureKind.PERMANENT),
    ],
)
def test_failure_classification(status, kind):
    assert failure_from_status(status) is kind


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap(settings):
    settings.NOTIFY_RETRY_POLICY = {"email": {"max_attempts": 9, "base_seconds": 10.0, "cap_seconds": 60.0}}
    for attempt, step in [(1, 10), (2, 20), (3, 40), (4, 60), (8, 60)]:
        delays = {retry_delay(channel="email", attempt=attempt) for _ in range(50)}
        assert all(timedelta(seconds=step / 2) <= d <= timedelta(seconds=step) for d in delays)
        assert len(delays) > 1  # jittered
