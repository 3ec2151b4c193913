"""Bulk recipient import: the upload, validation by the API's rules, the chunked upsert, the
admin page. The worker's part runs here in the test's process (the same engine call the task
makes); tests/e2e/test_recipient_import_e2e.py runs it in real, killable workers."""

import json
from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from apps.api.serializers import RecipientSerializer
from apps.audiences.models import Topic, TopicMembership
from apps.recipients.imports import RowRefused, recipient_fields_validate, recipient_import_process
from apps.recipients.models import (
    Recipient,
    RecipientImport,
    RecipientImportLine,
)
from apps.tenants.models import Scope
from tests.factories import ApiKeyFactory

URL = "/api/v1/recipients/import"
NDJSON = "application/x-ndjson"


def ndjson(*rows: Any) -> bytes:
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows).encode()


def upload(api, body: bytes, content_type: str = NDJSON) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    response = api.post(URL, data=body, content_type=content_type)
    assert response.status_code == 202, response.content
    return response.json()


def process_and_read(api, import_id: str) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    recipient_import_process(import_id=RecipientImport.objects.get(id=import_id).id)
    response = api.get(f"/api/v1/recipients/imports/{import_id}")
    assert response.status_code == 200
    return response.json()


def test_an_ndjson_import_creates_updates_and_refuses_lines_with_their_number_and_reason(api, workspace, settings):
    settings.NOTIFY_IMPORT_CHUNK = 3  # several chunks, each its own transaction
    Recipient.objects.create(
        tenant=workspace.tenant, external_id="known", email="old@example.com", phone="+14155550100", locale="fr"
    )
    body = ndjson(
        {"external_id": "u1", "email": "u1@example.com", "phone": "+44 20 7946 0958", "timezone": "Europe/London"},
        {"external_id": "u2", "email": "not-an-email"},
        "",  # blank lines are skipped, but counted as lines
        "{not json",
        {"external_id": "known", "email": "new@example.com"},
        ["a", "list"],
        {"external_id": "u3", "timezone": "Mars/Olympus"},
        {"email": "nobody@example.com"},
        {"external_id": "u4", "phone": "12"},
        {"external_id": "u5", "locale": "de-DE", "attributes": {"plan": "pro"}},
        {"external_id": "u6", "attributes": "pro"},
        {"external_id": "u7", "emial": "typo@example.com"},
        '{"external_id": "u8", "locale": "\\u0000"}',
    )
    accepted = upload(api, body)
    assert accepted["status"] == "queued"
    assert accepted["rows_total"] == 12

    result = process_and_read(api, accepted["id"])

    assert result["status"] == "completed"
    assert result["progress"] == 1.0
    assert (result["rows_processed"], result["created"], result["updated"], result["refused"]) == (12, 2, 1, 9)
    assert result["refusals"] == [
        {"line": 2, "reason": "email: Enter a valid email address."},
        {"line": 4, "reason": result["refusals"][1]["reason"]},
        {"line": 6, "reason": "Each line must be a JSON object, with an external_id."},
        {"line": 7, "reason": "timezone: 'Mars/Olympus' is not an IANA timezone (for example Europe/Paris)."},
        {"line": 8, "reason": "external_id: This field is required."},
        {"line": 9, "reason": "phone: Give a valid number in E.164 format, for example +14155550123."},
        {"line": 11, "reason": 'attributes: Expected a dictionary of items but got type "str".'},
        {"line": 12, "reason": result["refusals"][7]["reason"]},
        {"line": 13, "reason": "Text may not contain NUL characters or unpaired surrogates."},
    ]
    assert result["refusals"][1]["reason"].startswith("Not valid JSON")
    assert result["refusals"][7]["reason"].startswith("Unknown field 'emial'")
    u1 = Recipient.objects.get(tenant=workspace.tenant, external_id="u1")
    assert (u1.email, u1.phone, u1.timezone) == ("u1@example.com", "+442079460958", "Europe/London")
    assert Recipient.objects.get(tenant=workspace.tenant, external_id="u5").attributes == {"plan": "pro"}
    # Updated, not duplicated; the fields the line left out are as they were.
    known = Recipient.objects.get(tenant=workspace.tenant, external_id="known")
    assert (known.email, known.phone, known.locale) == ("new@example.com", "+14155550100", "fr")
    assert Recipient.objects.filter(tenant=workspace.tenant).count() == 3
    # The staged lines are gone once processed.
    assert not RecipientImportLine.objects.filter(recipient_import_id=accepted["id"]).exists()


def test_a_csv_import_with_a_header_empty_cells_left_as_they_are_and_bad_lines(api, workspace):
    Recipient.objects.create(tenant=workspace.tenant, external_id="known", email="keep@example.com", locale="fr")
    body = (
        "\ufeffexternal_id,email,phone,locale,timezone,attributes\r\n"
        'c1,c1@example.com,+14155550123,en-US,America/New_York,"{""plan"": ""free""}"\r\n'
        "known,,,de,,\r\n"
        "c2,bad@,,,,\r\n"
        "c3,c3@example.com\r\n"
        "c4,,,,,not json\r\n"
        '"c5,unterminated\r\n'
    ).encode()
    accepted = upload(api, body, content_type="text/csv; charset=utf-8")
    assert accepted["rows_total"] == 6

    result = process_and_read(api, accepted["id"])

    assert (result["created"], result["updated"], result["refused"]) == (1, 1, 4)
    assert [refusal["line"] for refusal in result["refusals"]] == [4, 5, 6, 7]
    reasons = [refusal["reason"] for refusal in result["refusals"]]
    assert reasons[0] == "email: Enter a valid email address."
    assert reasons[1] == "The line has 2 fields; the header has 6."
    assert reasons[2] == 'attributes: Give a JSON object, for example {"plan": "pro"}.'
    assert reasons[3].startswith("Not a valid CSV line")
    c1 = Recipient.objects.get(tenant=workspace.tenant, external_id="c1")
    assert (c1.phone, c1.locale, c1.timezone, c1.attributes) == (
        "+14155550123",
        "en-US",
        "America/New_York",
        {"plan": "free"},
    )
    known = Recipient.objects.get(tenant=workspace.tenant, external_id="known")
    assert (known.email, known.locale) == ("keep@example.com", "de")


def test_running_an_import_again_or_uploading_the_same_file_again_is_harmless(api, workspace, settings):
    settings.NOTIFY_IMPORT_CHUNK = 4
    body = ndjson(*({"external_id": f"r{i}", "email": f"r{i}@example.com"} for i in range(10)))
    first = upload(api, body)
    process_and_read(api, first["id"])
    before = {r.external_id: (r.id, r.updated_at) for r in Recipient.objects.filter(tenant=workspace.tenant)}

    # A duplicate task for a finished import finds nothing to do.
    again = process_and_read(api, first["id"])
    assert (again["created"], again["rows_processed"]) == (10, 10)

    second = process_and_read(api, upload(api, body)["id"])
    assert (second["created"], second["updated"], second["unchanged"]) == (0, 0, 10)
    after = {r.external_id: (r.id, r.updated_at) for r in Recipient.objects.filter(tenant=workspace.tenant)}
    assert after == before  # not rewritten


def test_the_same_recipient_on_two_lines_gets_both_lines_in_file_order(api, workspace):
    body = ndjson(
        {"external_id": "twice", "email": "first@example.com", "locale": "fr"},
        {"external_id": "twice", "email": "second@example.com"},
    )
    result = process_and_read(api, upload(api, body)["id"])
    assert result["created"] == 1
    twice = Recipient.objects.get(tenant=workspace.tenant, external_id="twice")
    assert (twice.email, twice.locale) == ("second@example.com", "fr")


def test_refusals_are_listed_up_to_the_limit_and_counted_beyond_it(api, settings):
    settings.NOTIFY_IMPORT_REFUSALS_KEPT = 3
    settings.NOTIFY_IMPORT_CHUNK = 2
    result = process_and_read(api, upload(api, ndjson(*({"email": "x"} for _ in range(7))))["id"])
    assert (result["refused"], result["refusals_listed"]) == (7, 3)
    assert [refusal["line"] for refusal in result["refusals"]] == [1, 2, 3]


def test_lines_that_cannot_be_text_are_refused_without_refusing_the_file(api, workspace):
    body = b'{"external_id": "ok"}\n{"external_id": "\xff"}\n' + b"x" * (70 * 1024) + b'\n{"external_id": "ok2"}\n'
    result = process_and_read(api, upload(api, body)["id"])
    assert [(r["line"], r["reason"]) for r in result["refusals"]] == [
        (2, "The line is not UTF-8 text (byte 18)."),
        (3, "The line is longer than 65536 bytes."),
    ]
    assert set(Recipient.objects.filter(tenant=workspace.tenant).values_list("external_id", flat=True)) == {"ok", "ok2"}


@pytest.mark.parametrize(
    "data",
    [
        {"external_id": "a", "email": " a@example.com "},
        {"external_id": "a", "email": "a@localhost"},
        {"external_id": "a", "email": "a@@example.com"},
        {"external_id": "a", "email": ""},
        {"external_id": "a", "email": None},
        {"external_id": "a", "email": "x" * 250 + "@example.com"},
        {"external_id": " "},
        {"external_id": 42},
        {"external_id": True},
        {"external_id": "x" * 256},
        {"external_id": "a", "phone": "+1 415 555 0123"},
        {"external_id": "a", "phone": "0612345678"},
        {"external_id": "a", "phone": ""},
        {"external_id": "a", "locale": "x" * 36},
        {"external_id": "a", "timezone": ""},
        {"external_id": "a", "timezone": "Asia/Kolkata"},
        {"external_id": "a", "timezone": "Nowhere/City"},
        {"external_id": "a", "attributes": ["x"]},
        {"external_id": "a", "attributes": {"nested": {"deep": [1, 2]}}},
    ],
)
def test_a_line_is_refused_exactly_when_the_api_would_refuse_the_same_recipient(data):
    serializer = RecipientSerializer(data=data)
    api_valid = serializer.is_valid()
    try:
        external_id, fields = recipient_fields_validate(data=data)
    except RowRefused as refusal:
        assert not api_valid, f"the API accepts what the import refused: {refusal}"
        field = next(iter(serializer.errors))
        assert str(refusal) == f"{field}: {serializer.errors[field][0]}"
    else:
        assert api_valid, f"the API refuses what the import accepted: {serializer.errors}"
        expected = dict(serializer.validated_data)
        assert external_id == expected.pop("external_id")
        assert fields == expected


def test_an_upload_that_is_not_ndjson_or_csv_or_has_a_bad_header_is_refused_whole(api):
    response = api.post(URL, data=b'{"external_id": "a"}', content_type="application/json")
    assert response.status_code == 415
    assert "Content-Type" in response.json()["error"]["fields"]

    response = api.post(URL, data=b"external_id,emial\na,b\n", content_type="text/csv")
    assert response.status_code == 400
    assert response.json()["error"]["fields"]["header"] == [
        "Unknown column 'emial' in the CSV header. Columns are: external_id, email, phone, locale, timezone, attributes."
    ]
    response = api.post(URL, data=b"email\na@example.com\n", content_type="text/csv")
    assert "no external_id column" in response.json()["error"]["fields"]["header"][0]
    response = api.post(URL, data=b"\n\n", content_type=NDJSON)
    assert response.json()["error"]["fields"]["body"] == ["The file has no recipients in it."]
    assert not RecipientImport.objects.exists()


def test_the_import_has_its_own_body_limit(api, settings):
    settings.NOTIFY_MAX_REQUEST_BYTES = 1000
    settings.NOTIFY_IMPORT_MAX_BYTES = 5000
    rows = ndjson(*({"external_id": f"id-{i:05d}"} for i in range(100)))  # over 1000, under 5000 bytes
    assert 1000 < len(rows) < 5000
    assert upload(api, rows)["rows_total"] == 100

    response = api.post(URL, data=rows * 3, content_type=NDJSON)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "request_too_large"
    # Other API paths keep the small limit.
    assert api.post("/api/v1/recipients", data=rows, content_type="application/json").status_code == 413


def test_the_body_limit_counts_what_is_read_not_what_content_length_claims(workspace, settings):
    from apps.recipients.imports import ImportTooLarge, recipient_import_start

    class Stream:
        """A body that goes on past what its sender declared (as a chunked upload may)."""

        def __init__(self) -> None:
            self.sent = 0

        def readline(self, size: int) -> bytes:
            self.sent += 1
            return b'{"external_id": "x"}\n' if self.sent < 10_000 else b""

    with pytest.raises(ImportTooLarge):
        recipient_import_start(
            tenant=workspace.tenant, file_format="ndjson", stream=Stream(), source="t", max_bytes=10_000
        )
    assert not RecipientImport.objects.exists()


def test_importing_needs_recipients_write_and_reading_needs_recipients_read(workspace, api):
    from rest_framework.test import APIClient

    reader = ApiKeyFactory(tenant=workspace.tenant, scopes=[Scope.RECIPIENTS_READ.value])
    writer = ApiKeyFactory(tenant=workspace.tenant, scopes=[Scope.RECIPIENTS_WRITE.value])
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {reader.raw_key}")
    response = client.post(URL, data=ndjson({"external_id": "a"}), content_type=NDJSON)
    assert (response.status_code, response.json()["error"]["scope"]) == (403, "recipients:write")

    client.credentials(HTTP_AUTHORIZATION=f"Bearer {writer.raw_key}")
    import_id = upload(client, ndjson({"external_id": "a"}))["id"]
    response = client.get(f"/api/v1/recipients/imports/{import_id}")
    assert (response.status_code, response.json()["error"]["scope"]) == (403, "recipients:read")

    client.credentials(HTTP_AUTHORIZATION=f"Bearer {reader.raw_key}")
    assert client.get(f"/api/v1/recipients/imports/{import_id}").status_code == 200
    # Another tenant's key cannot see it.
    other = ApiKeyFactory()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {other.raw_key}")
    assert client.get(f"/api/v1/recipients/imports/{import_id}").status_code == 404


def test_the_admin_uploads_a_file_and_shows_the_import_with_a_progress_bar(workspace):
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    page = admin.get("/admin/recipients/recipientimport/add/")
    assert page.status_code == 200 and b'type="file"' in page.content

    csv_file = SimpleUploadedFile("people.csv", b"external_id,email\nadm1,adm1@example.com\nadm2,nope\n")
    response = admin.post(
        "/admin/recipients/recipientimport/add/",
        {"tenant": workspace.tenant.pk, "format": "csv", "file": csv_file},
        follow=True,
    )
    assert response.status_code == 200
    recipient_import = RecipientImport.objects.get()
    assert recipient_import.source == "staff ops"
    assert b"<progress" in response.content
    assert b'http-equiv="refresh"' in response.content  # it reloads while unfinished

    recipient_import_process(import_id=recipient_import.id)
    page = admin.get(f"/admin/recipients/recipientimport/{recipient_import.pk}/change/")
    assert b'<progress value="1.0000"' in page.content
    assert b'http-equiv="refresh"' not in page.content
    assert b"email: Enter a valid email address." in page.content
    listing = admin.get("/admin/recipients/recipientimport/")
    assert b"<progress" in listing.content
    assert Recipient.objects.filter(tenant=workspace.tenant, external_id="adm1").exists()

    bad = admin.post(
        "/admin/recipients/recipientimport/add/",
        {"tenant": workspace.tenant.pk, "format": "csv", "file": SimpleUploadedFile("x.csv", b"emial\nx\n")},
    )
    assert b"Unknown column &#x27;emial&#x27;" in bad.content


def test_an_import_can_subscribe_every_imported_recipient_to_a_topic(api, workspace, settings):
    settings.NOTIFY_IMPORT_CHUNK = 2  # the subscriptions are made chunk by chunk
    news = Topic.objects.create(tenant=workspace.tenant, key="news")
    already = Recipient.objects.create(tenant=workspace.tenant, external_id="t1")
    TopicMembership.objects.create(topic=news, recipient=already)
    body = ndjson(*({"external_id": f"t{n}", "email": f"t{n}@example.com"} for n in range(1, 6)), {"email": "x@y.z"})

    response = api.post(f"{URL}?topic=news", data=body, content_type=NDJSON)
    assert response.status_code == 202, response.content
    assert response.json()["topic"] == "news"
    result = process_and_read(api, response.json()["id"])
    assert result["status"] == "completed" and result["refused"] == 1
    subscribed = set(news.memberships.values_list("recipient__external_id", flat=True))
    assert subscribed == {"t1", "t2", "t3", "t4", "t5"}

    # A topic that is not this tenant's, or none at all, refuses the file before reading it.
    other = Topic.objects.create(tenant=ApiKeyFactory().tenant, key="theirs")
    for key in ("theirs", "nope", "not a key!"):
        refused = api.post(f"{URL}?topic={key}", data=body, content_type=NDJSON)
        assert refused.status_code == 400, refused.content
        assert "topic" in refused.json()["error"]["fields"]
    assert not other.memberships.exists()
    assert RecipientImport.objects.count() == 1


def test_the_admin_import_subscribes_to_a_topic_of_the_chosen_tenant_only(workspace):
    admin = Client()
    admin.force_login(get_user_model().objects.create_superuser("ops", "ops@example.com", "pw"))
    news = Topic.objects.create(tenant=workspace.tenant, key="news")
    theirs = Topic.objects.create(tenant=ApiKeyFactory().tenant, key="theirs")

    def post(topic: Topic) -> Any:
        csv_file = SimpleUploadedFile("people.csv", b"external_id,email\nadm1,adm1@example.com\n")
        return admin.post(
            "/admin/recipients/recipientimport/add/",
            {"tenant": workspace.tenant.pk, "format": "csv", "file": csv_file, "topic": topic.pk},
        )

    assert b"Choose a topic of the tenant the recipients go to." in post(theirs).content
    assert post(news).status_code == 302
    recipient_import_process(import_id=RecipientImport.objects.get().id)
    assert list(news.memberships.values_list("recipient__external_id", flat=True)) == ["adm1"]
