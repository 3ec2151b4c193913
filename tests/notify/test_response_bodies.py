"""A provider's answer is kept in the history as its status and a short reason, never as the
body it sent: an error page (or whatever a tenant-chosen address answers) stays out of the
deliveries' history, their status reasons, the dead letters and the devices' reasons."""

import pytest

from apps.deliveries.models import DeadLetter, Delivery, DeliveryEvent
from apps.recipients.models import Device
from tests.factories import RecipientFactory
from tests.notify.test_push import device, push, push_category  # noqa: F401 - a fixture
from tests.notify.test_send import ingest_one, send_now
from tests.notify.test_sms import send_sms, sms_category  # noqa: F401 - a fixture

SECRET = "INTERNAL-ANSWER-aws_secret_access_key=abc123"
ERROR_PAGE = f"<html><body><h1>Oops</h1><pre>{SECRET}</pre></body></html>"


def history_texts(delivery: Delivery) -> list[str]:
    return [
        delivery.status_reason,
        *DeliveryEvent.objects.filter(delivery=delivery).values_list("reason", flat=True),
        *DeadLetter.objects.filter(delivery=delivery).values_list("reason", flat=True),
        *[str(detail) for detail in DeliveryEvent.objects.filter(delivery=delivery).values_list("detail", flat=True)],
    ]


def assert_no_body(delivery: Delivery, status: int) -> None:
    texts = history_texts(delivery)
    assert all(SECRET not in text and "<html" not in text for text in texts), texts
    assert str(status) in delivery.status_reason


@pytest.mark.parametrize("status", [422, 500])
def test_email(workspace, sandbox, status):
    sandbox.faults_set(address_status={"ada@example.com": status}, error_body=ERROR_PAGE)
    assert_no_body(send_now(ingest_one(workspace)), status)


@pytest.mark.parametrize("status", [400, 500])
@pytest.mark.usefixtures("sms_category")
def test_sms(workspace, sandbox, status):
    sandbox.faults_set(provider="twilio", address_status={"+14155550123": status}, error_body=ERROR_PAGE)
    assert_no_body(send_sms(workspace, phone="+14155550123"), status)


@pytest.mark.parametrize("status", [400, 503])
@pytest.mark.usefixtures("push_category")
def test_mobile_push(workspace, sandbox, status):
    ada = RecipientFactory(tenant=workspace.tenant, external_id="ada")
    device(workspace, ada, "token-phone")
    sandbox.faults_set(provider="fcm", address_status={"token-phone": status}, error_body=ERROR_PAGE)
    delivery = push(workspace)
    assert_no_body(delivery, status)
    assert all(SECRET not in reason for reason in Device.objects.values_list("deactivated_reason", flat=True))
