"""The send and record stages in this process, with real anymail talking to the sandbox."""

import uuid
from datetime import timedelta

import pytest
from anymail.backends.postmark import PostmarkPayload
from anymail.exceptions import AnymailInvalidAddress
from anymail.utils import parse_address_list
from django.conf import settings as django_settings
from django.core.mail import get_connection
from django.utils import timezone

from apps.catalog.models import Priority
from apps.deliveries.models import DeadLetter, Delivery, DeliveryStatus
from notify.channels.base import OutboundMessage, RenderedContent, SendOutcome
from notify.channels.email import _BatchPayload, _email, _email_parts, _PayloadTemplate, _postmark_payloads, _to_list
from notify.pipeline.control import dead_letters_replay
from notify.pipeline.dispatch import recorded_publish
from notify.pipeline.ingest import EventRequest, RecipientRef, events_ingest
from notify.pipeline.record import outcomes_record
from notify.pipeline.send import deliveries_claim, deliveries_send
from notify.resilience.failures import FailureKind
from tests.factories import CategoryFactory, template_with_email


def ingest_one(workspace, *, email: str = "ada@example.com", category: str = "welcome") -> Delivery:  # type: ignore[no-untyped-def]
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key=category,
                recipients=[RecipientRef(external_id="ada", fields={"email": email})],
                data={"name": "Ada"},
            )
        ],
    )
    return Delivery.objects.get(notification_id=result.response["notification_ids"][0])


def ingest_many(workspace, *, category: str, emails: dict[str, str], data: dict | None = None) -> list[str]:  # type: ignore[no-untyped-def]
    """One event to the recipients (external id -> email); the ids of their deliveries."""
    [result] = events_ingest(
        api_key=workspace.api_key,
        events=[
            EventRequest(
                category_key=category,
                recipients=[RecipientRef(external_id=key, fields={"email": email}) for key, email in emails.items()],
                data=data or {},
            )
        ],
    )
    notification_ids = result.response["notification_ids"]
    return [str(d) for d in Delivery.objects.filter(notification_id__in=notification_ids).values_list("id", flat=True)]


def send_now(delivery: Delivery) -> Delivery:
    Delivery.objects.filter(pk=delivery.pk).update(next_attempt_at=timezone.now())  # as if the backoff passed
    deliveries_send(delivery_ids=[str(delivery.pk)])
    return Delivery.objects.get(pk=delivery.pk)


def history(delivery: Delivery) -> list[str]:
    return list(delivery.events.values_list("status", flat=True))


def test_a_send_is_recorded_with_the_providers_message_id(workspace, sandbox):
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.SENT
    [request] = sandbox.requests_log()
    assert request["outcome"] == "accepted"
    assert request["subject"] == "Hello Ada"
    assert request["delivery_id"] == str(delivery.pk)
    assert delivery.provider_message_id == request["message_id"]
    assert history(delivery) == ["queued", "sent"]


def test_a_transient_failure_schedules_a_retry_with_backoff(workspace, sandbox, django_capture_on_commit_callbacks):
    sandbox.faults_set(fail_next=[503])
    delivery = ingest_one(workspace)
    with django_capture_on_commit_callbacks() as published:
        delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.RETRYING
    assert delivery.attempt_count == 1
    assert delivery.next_attempt_at > timezone.now() - timedelta(seconds=1)
    assert "503" in delivery.status_reason
    assert len(published) == 1  # the retry rides a broker countdown

    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.SENT
    assert delivery.attempt_count == 2
    assert history(delivery) == ["queued", "retrying", "sent"]
    assert [r["status"] for r in sandbox.requests_log()] == [503, 200]


def test_an_unreachable_provider_is_a_transient_failure(workspace, sandbox, settings):
    settings.ANYMAIL = {**settings.ANYMAIL, "POSTMARK_API_URL": "http://127.0.0.1:9/postmark/"}
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.RETRYING


def test_a_permanent_failure_is_not_retried(workspace, sandbox):
    sandbox.faults_set(address_status={"ada@example.com": 422})
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.FAILED
    assert "Invalid 'To' address" in delivery.status_reason
    deliveries_send(delivery_ids=[str(delivery.pk)])  # a duplicate task finds nothing to claim
    assert len(sandbox.requests_log()) == 1
    assert not DeadLetter.objects.exists()


def test_exhausted_retries_dead_letter_then_replay_delivers(workspace, sandbox, django_capture_on_commit_callbacks):
    sandbox.faults_set(address_status={"ada@example.com": 500})
    delivery = ingest_one(workspace)
    for _ in range(3):  # NOTIFY_EMAIL_MAX_ATTEMPTS in the test settings
        with django_capture_on_commit_callbacks(execute=False) as published:
            delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.DEAD
    assert history(delivery) == ["queued", "retrying", "retrying", "dead"]
    dead_letter = DeadLetter.objects.get(delivery=delivery)
    assert dead_letter.attempts == 3
    assert len(published) == 1  # the notice for the channel's dead-letter queue

    sandbox.faults_set()
    assert dead_letters_replay(dead_letter_ids=[dead_letter.pk], actor="ops@example.com") == 1
    assert dead_letters_replay(dead_letter_ids=[dead_letter.pk], actor="ops@example.com") == 0
    delivery = send_now(delivery)
    assert delivery.status == DeliveryStatus.SENT
    assert history(delivery)[-2:] == ["queued", "sent"]
    assert (
        "replayed from the dead-letter queue by ops@example.com"
        in delivery.events.get(status="queued", attempt=0, reason__startswith="replayed").reason
    )
    dead_letter.refresh_from_db()
    assert dead_letter.replayed_by == "ops@example.com"


def test_a_claimed_delivery_cannot_be_claimed_again(workspace, sandbox):
    delivery = ingest_one(workspace)
    token, claimed = deliveries_claim(delivery_ids=[str(delivery.pk)])
    assert [d.pk for d in claimed] == [delivery.pk]
    _, claimed_again = deliveries_claim(delivery_ids=[str(delivery.pk)])
    assert claimed_again == []


def test_an_expired_lease_holder_cannot_record(workspace, sandbox):
    delivery = ingest_one(workspace)
    stale_token, claimed = deliveries_claim(delivery_ids=[str(delivery.pk)])
    # The sweeper re-queued it and another worker claimed it with a new token.
    Delivery.objects.filter(pk=delivery.pk).update(status=DeliveryStatus.QUEUED)
    fresh_token, _ = deliveries_claim(delivery_ids=[str(delivery.pk)])
    outcomes_record(
        lease_token=stale_token,
        deliveries={d.pk: d for d in claimed},
        outcomes=[SendOutcome(delivery_id=delivery.pk, provider_message_id="stale")],
    )
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.SENDING
    assert delivery.lease_token == fresh_token


def test_the_ledger_returns_what_follows_and_the_send_stage_publishes_it(workspace, sandbox):
    """Record is a sink: a failed attempt comes back as a retry or a dead letter, written
    but not published; publishing it (the send stage's part) sets when it was published."""
    retried, spent = ingest_one(workspace), ingest_one(workspace, category="otp")
    Delivery.objects.filter(pk=spent.pk).update(
        attempt_count=django_settings.NOTIFY_RETRY_POLICY["email"]["max_attempts"] - 1
    )
    published_before = Delivery.objects.get(pk=retried.pk).published_at
    token, claimed = deliveries_claim(delivery_ids=[str(retried.pk), str(spent.pk)])
    outcomes = [SendOutcome(delivery_id=d.pk, failure=FailureKind.TRANSIENT, reason="HTTP 503") for d in claimed]

    recorded = outcomes_record(lease_token=token, deliveries={d.pk: d for d in claimed}, outcomes=outcomes)

    assert [[d.pk for d in group] for group in recorded.retries] == [[retried.pk]]
    assert [dead.delivery_id for dead in recorded.dead_letters] == [spent.pk]
    assert DeadLetter.objects.filter(delivery_id=spent.pk).exists()
    assert {row.delivery_id: row.status for row in recorded.history} == {
        retried.pk: DeliveryStatus.RETRYING,
        spent.pk: DeliveryStatus.DEAD,
    }
    stored = Delivery.objects.get(pk=retried.pk)
    assert stored.status == DeliveryStatus.RETRYING
    assert stored.published_at == published_before  # the ledger published nothing

    recorded_publish(recorded=recorded)
    assert Delivery.objects.get(pk=retried.pk).published_at == stored.next_attempt_at


@pytest.mark.parametrize("status", [DeliveryStatus.CANCELLED, DeliveryStatus.SENT])
def test_only_queued_or_retrying_deliveries_are_claimed(workspace, sandbox, status):
    delivery = ingest_one(workspace)
    Delivery.objects.filter(pk=delivery.pk).update(status=status)
    assert deliveries_send(delivery_ids=[str(delivery.pk)]) == 0
    assert sandbox.requests_log() == []


def test_content_that_cannot_render_fails_permanently_without_a_send(workspace, sandbox):
    from apps.catalog.models import TemplateVariant

    # Saved around the admin's validation, as an older row or a direct write could be.
    TemplateVariant.objects.filter(version__template=workspace.normal.template).update(subject="{% if %}")
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.FAILED
    assert "template error" in delivery.status_reason
    assert sandbox.requests_log() == []


def test_template_content_is_checked_before_it_is_saved(workspace):
    from django.core.exceptions import ValidationError

    from apps.catalog.models import TemplateVariant

    variant = TemplateVariant(channel="email", subject="Hi {{ data.name }", html="{% for %}")
    with pytest.raises(ValidationError) as raised:
        variant.clean()
    assert set(raised.value.message_dict) == {"html"}


def test_an_address_anymail_cannot_encode_fails_alone_in_a_batch(workspace, sandbox):
    emails = {"ok1": "ok1@example.com", "bad": "a@\u2603.net", "ok2": "ok2@example.com"}
    ids = ingest_many(workspace, category="digest", emails=emails)
    deliveries_send(delivery_ids=ids)
    by_recipient = dict(
        Delivery.objects.filter(id__in=ids).values_list("notification__recipient__external_id", "status")
    )
    assert by_recipient == {"ok1": "sent", "bad": "failed", "ok2": "sent"}
    assert sorted(r["to"] for r in sandbox.requests_log()) == ["ok1@example.com", "ok2@example.com"]


def test_a_chunk_whose_lease_was_taken_over_is_not_sent(workspace, sandbox):
    import uuid

    from notify.pipeline.send import _lease_renew

    first, second = ingest_one(workspace), ingest_one(workspace, category="otp")
    token, claimed = deliveries_claim(delivery_ids=[str(first.pk), str(second.pk)])
    Delivery.objects.filter(pk=second.pk).update(lease_token=uuid.uuid4())  # re-queued and claimed elsewhere
    assert [d.pk for d in _lease_renew(lease_token=token, deliveries=claimed)] == [first.pk]


def test_provider_feedback_wins_over_a_pending_retry(workspace, sandbox):
    from notify.channels.email import EmailChannel
    from notify.pipeline.feedback import feedback_receive
    from notify.pipeline.record import Feedback

    sandbox.faults_set(fail_next=[503])
    delivery = send_now(ingest_one(workspace))
    assert delivery.status == DeliveryStatus.RETRYING
    assert feedback_receive(
        feedback=Feedback(
            delivery_id=str(delivery.pk), normalized_status="delivered", provider_status="postmark:Delivery"
        ),
        address_for=EmailChannel().address_for,
    )
    delivery.refresh_from_db()
    assert delivery.status == DeliveryStatus.DELIVERED
    assert deliveries_send(delivery_ids=[str(delivery.pk)]) == 0


def test_a_template_that_mentions_the_recipient_is_rendered_for_each_one_in_a_batch(workspace, sandbox):
    """Content that cannot differ between recipients is rendered once per batch and shared; a
    template that mentions the recipient must never show one person another's details."""
    personal = template_with_email(
        tenant=workspace.tenant,
        key="personal",
        variants={"": {"subject": "For {{ recipient.id }}", "body": "Hi {{ recipient.email }}, {{ data.name }}"}},
    )
    CategoryFactory(tenant=workspace.tenant, key="personal", template=personal, default_priority=Priority.BULK)
    emails = {"ada": "ada@example.com", "bo": "bo@example.com", "cy": "cy@example.com"}
    deliveries_send(delivery_ids=ingest_many(workspace, category="personal", emails=emails, data={"name": "Ada"}))
    sent = {r["to"]: (r["subject"], r["text"].split("\n")[0]) for r in sandbox.requests_log()}
    assert sent == {email: (f"For {key}", f"Hi {email}, Ada") for key, email in emails.items()}

    deliveries_send(delivery_ids=ingest_many(workspace, category="digest", emails=emails, data={"name": "Ada"}))
    shared = [r for r in sandbox.requests_log() if r["subject"] == "Hello Ada"]
    assert sorted(r["to"] for r in shared) == sorted(emails.values())


@pytest.mark.parametrize(
    "address",
    [
        "ada@example.com",
        "o'brien+news@mail.example.co.uk",
        "a.b-c_d@example-mail.io",
        # Not dot-atoms: parsed by anymail as before.
        "ünïcode@example.com",
        '"quoted local"@example.com',
        "Ada Lovelace <ada@example.com>",
    ],
)
def test_a_batch_payload_is_what_anymail_builds_for_the_same_message(address):
    connection = get_connection("anymail.backends.postmark.EmailBackend", server_token="token")
    message = OutboundMessage(
        delivery_id=uuid.uuid4(),
        resend_round=0,
        address=address,
        content=RenderedContent(subject="Hi", title="", body="Hello", html="<p>Hello</p>", link="", data={}),
        category_key="news",
        unsubscribe_url="http://example.com/u/t",
        preferences_url="http://example.com/u/t/preferences",
    )
    email = _email(message=message, connection=connection, from_email=django_settings.DEFAULT_FROM_EMAIL)
    ours = _BatchPayload(email, connection.send_defaults, connection).data
    anymails = PostmarkPayload(email, connection.send_defaults, connection).data
    assert ours == anymails
    assert address.rpartition("<")[2].rstrip(">") in ours["To"]


def batch_message(*, address: str, subject: str, body: str, html: str, unsubscribe: bool, tag: str = "news"):
    return OutboundMessage(
        delivery_id=uuid.uuid4(),
        resend_round=1,
        address=address,
        content=RenderedContent(subject=subject, title="", body=body, html=html, link="", data={}),
        category_key=tag,
        unsubscribe_url=f"http://example.com/u/{uuid.uuid4()}" if unsubscribe else "",
        preferences_url="http://example.com/u/t/preferences" if unsubscribe else "",
    )


def anymail_payload(message: OutboundMessage, connection) -> dict:
    email = _email(message=message, connection=connection, from_email=django_settings.DEFAULT_FROM_EMAIL)
    return PostmarkPayload(email, connection.send_defaults, connection).data


def test_a_batch_payload_made_from_the_first_messages_is_anymails_for_each_message():
    connection = get_connection("anymail.backends.postmark.EmailBackend", server_token="token")
    first = batch_message(address="ada@example.com", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=True)
    template = _PayloadTemplate(data=anymail_payload(first, connection), parts=_email_parts(message=first))
    same_shape = [
        batch_message(
            address="bob@example.org", subject="Ça va? «news»", body="Line\r\nnext", html="<b>é</b>", unsubscribe=True
        ),
        batch_message(
            address="o'brien+x@mail.example.co.uk",
            subject="",
            body="",
            html="<html><body>x</body></html>",
            unsubscribe=True,
        ),
        batch_message(
            address="c@example.com",
            subject='Quotes " and \\ and\nnewline',
            body="{}",
            html="<p>{}</p>",
            unsubscribe=True,
        ),
    ]
    for message in same_shape:
        made = template.payload_for(message=message, parts=_email_parts(message=message))
        assert made is not None
        assert made == anymail_payload(message, connection)
    other_shapes = [
        batch_message(address="d@example.com", subject="Hi", body="Hello", html="", unsubscribe=True),
        batch_message(address="d@example.com", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=False),
        batch_message(address="d@example.com", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=True, tag="x"),
        batch_message(address="Dee <d@example.com>", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=True),
    ]
    for message in other_shapes:
        assert template.payload_for(message=message, parts=_email_parts(message=message)) is None


def test_a_mixed_batchs_payloads_are_anymails_and_a_refused_address_is_refused_alone():
    connection = get_connection("anymail.backends.postmark.EmailBackend", server_token="token")
    messages = [
        batch_message(address="ünïcode@example.com", subject="a", body="b", html="", unsubscribe=False),
        batch_message(address="ada@example.com", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=True),
        batch_message(address="=?utf-8?q?abc?=@example.com", subject="x", body="y", html="", unsubscribe=False),
        batch_message(address="bob@example.com", subject="Hi Bob", body="Hello", html="<p>Bob</p>", unsubscribe=True),
        batch_message(address="cy@example.com", subject="Plain", body="Text only", html="", unsubscribe=True),
        batch_message(address="Dee <dee@example.com>", subject="Hi", body="Hello", html="<p>Hi</p>", unsubscribe=True),
    ]
    payloads, refused = _postmark_payloads(
        connection=connection, messages=messages, from_email=django_settings.DEFAULT_FROM_EMAIL, started=0.0
    )
    assert list(refused) == [2]
    assert refused[2].failure == FailureKind.PERMANENT
    assert payloads == [anymail_payload(m, connection) for i, m in enumerate(messages) if i != 2]


def test_an_address_starting_with_an_encoded_word_is_refused_as_anymail_refuses_it():
    address = "=?utf-8?q?abc?=@example.com"  # a valid dot-atom, but the header parser decodes it
    with pytest.raises(AnymailInvalidAddress):
        parse_address_list([address], field="to")
    with pytest.raises(AnymailInvalidAddress):
        _to_list([address])
