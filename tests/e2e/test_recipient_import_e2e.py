"""Bulk recipient import in real Celery workers: progress reaching done, and a worker
SIGKILLed mid-import whose import the sweeper hands to another worker, which completes it."""

import json

from apps.recipients.models import ImportStatus, Recipient, RecipientImport
from tests.helpers import wait_for

NDJSON = "application/x-ndjson"


def import_file(api, rows: int) -> str:  # type: ignore[no-untyped-def]
    body = "".join(
        json.dumps({"external_id": f"e2e-{i:06d}", "email": f"p{i}@example.com", "locale": "en"}) + "\n"
        for i in range(rows)
    ).encode()
    response = api.post("/api/v1/recipients/import", data=body, content_type=NDJSON)
    assert response.status_code == 202, response.content
    return response.json()["id"]


def test_two_workers_import_the_file_and_the_api_shows_progress_reaching_done(
    api, workers, workspace, monkeypatch, settings
):
    monkeypatch.setenv("NOTIFY_IMPORT_CHUNK", "500")
    settings.NOTIFY_IMPORT_WORKERS = 2  # two tasks, taking chunks side by side
    workers.start("bulk", concurrency=2)
    import_id = import_file(api, 5000)

    seen: set[float] = set()

    def done() -> bool:
        body = api.get(f"/api/v1/recipients/imports/{import_id}").json()
        seen.add(body["progress"])
        return body["status"] == "completed"

    wait_for(done, timeout=60, interval=0.02, what="the import to complete")
    body = api.get(f"/api/v1/recipients/imports/{import_id}").json()
    assert (body["rows_processed"], body["created"], body["refused"], body["progress"]) == (5000, 5000, 0, 1.0)
    assert body["started_at"] and body["finished_at"]
    assert Recipient.objects.filter(tenant=workspace.tenant).count() == 5000
    assert max(seen) == 1.0


def test_an_import_whose_worker_is_killed_mid_import_completes_exactly_once(
    api, workers, workspace, monkeypatch, settings
):
    # Small chunks, so that the import is still going when its worker dies; a short stall
    # time for the sweeper, which runs in the maintenance worker, scheduled by beat. One task
    # only: no second message is waiting in the queue, so only the sweeper can resume it.
    settings.NOTIFY_IMPORT_WORKERS = 1
    monkeypatch.setenv("NOTIFY_IMPORT_WORKERS", "1")
    monkeypatch.setenv("NOTIFY_IMPORT_CHUNK", "500")
    monkeypatch.setenv("NOTIFY_IMPORT_STALL_SECONDS", "2")
    rows = 30_000
    doomed = workers.start("bulk")
    import_id = import_file(api, rows)

    wait_for(
        lambda: RecipientImport.objects.get(id=import_id).rows_processed >= 2000,
        timeout=60,
        interval=0.01,
        what="a few chunks to commit",
    )
    doomed.kill()
    at_kill = RecipientImport.objects.get(id=import_id)
    assert at_kill.status == ImportStatus.RUNNING and at_kill.rows_processed < rows, (
        "the import finished before the kill"
    )
    assert at_kill.created == Recipient.objects.filter(tenant=workspace.tenant).count()

    workers.start("bulk")
    workers.start("maintenance")
    workers.start_beat()
    wait_for(
        lambda: RecipientImport.objects.get(id=import_id).status == ImportStatus.COMPLETED,
        timeout=90,
        what="the import to complete in another worker",
    )
    finished = RecipientImport.objects.get(id=import_id)
    assert (finished.rows_processed, finished.created, finished.updated, finished.refused) == (rows, rows, 0, 0)
    assert Recipient.objects.filter(tenant=workspace.tenant).count() == rows
    assert (
        Recipient.objects.filter(tenant=workspace.tenant, external_id__startswith="e2e-")
        .values("external_id")
        .distinct()
        .count()
        == rows
    )
