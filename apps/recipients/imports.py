"""Bulk recipient import: an uploaded NDJSON or CSV file becomes recipients, in the database.

The request streams the file line by line into RecipientImportLine with COPY (the upload is
never held in memory, and the worker may run on another host: the staging table, not a local
disk, carries the file between them). A worker then takes the staged lines in chunks, in
line order: it validates each line by the API's rules, upserts the chunk's recipients in one
statement, records refusals, deletes the chunk's lines and adds to the import's counts, all
in one transaction. The staged lines that are left are the cursor: a worker killed mid-chunk
leaves its chunk as it was, the sweeper publishes the import again, and the upsert makes a
repeated chunk harmless. Several workers take chunks of one import side by side.

Within a chunk, lines apply in file order: a recipient named on two lines gets the second
line's fields over the first's. Across chunks that workers process at the same time, the
chunk that commits last wins (NOTIFY_IMPORT_WORKERS=1 applies the whole file in order). A
field a line leaves out (an empty CSV cell, a key an NDJSON object does not have) is left as
it was, as for inline recipients in events."""

import csv
import json
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import lru_cache
from typing import IO, Any
from uuid import UUID

from celery import current_app
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import validate_email
from django.db import DatabaseError, connection, transaction
from django.utils import timezone
from uuid6 import uuid7

from apps.audiences.models import Topic, TopicMembership
from apps.recipients.models import (
    ImportFormat,
    ImportStatus,
    Recipient,
    RecipientImport,
    RecipientImportLine,
    RecipientImportRefusal,
    validate_timezone,
)
from apps.recipients.phone import e164
from apps.tenants.models import Tenant
from config.queues import IMPORT_QUEUE
from notify.pipeline.bulk import retry_lock_conflicts
from notify.pipeline.ingest import RECIPIENT_FIELDS, recipients_upsert_statement

logger = logging.getLogger(__name__)

IMPORT_TASK = "recipients.import"
CSV_COLUMNS = ("external_id", *RECIPIENT_FIELDS)
# Read-only fields of a recipient as the API shows it: a re-imported export may carry them.
IGNORED_FIELDS = frozenset({"created_at", "updated_at"})
# A longer line is refused without being read into memory whole.
MAX_LINE_BYTES = 64 * 1024
# An import that created this many recipients refreshes the planner's statistics at its end.
ANALYZE_AFTER_CREATED = 10_000
STAGE_BATCH = 2000  # lines per INSERT where COPY is not available (the demo's SQLite)


class ImportRefused(Exception):
    """An upload refused as a whole; `field` names what is at fault (the header, the body)."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class ImportTooLarge(ImportRefused):
    def __init__(self, *, limit: int) -> None:
        super().__init__(field="body", message=f"The file is over the import limit of {limit} bytes.")


class RowRefused(Exception):
    """One line refused; the message says which field and why."""


# --- The upload: stream lines into staging ------------------------------------------------


@dataclass
class StagedLine:
    line_number: int
    raw: str
    problem: str = ""


def _lines_read(*, stream: IO[bytes], max_bytes: int) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) for each line of the stream, without its line ending; None for a
    line longer than MAX_LINE_BYTES, which is skipped in pieces. Raises ImportTooLarge past
    max_bytes, counting what was read, whatever the request's Content-Length said."""
    total = 0
    line_number = 0
    while True:
        chunk = stream.readline(MAX_LINE_BYTES + 1)
        if not chunk:
            return
        total += len(chunk)
        line_number += 1
        too_long = len(chunk) > MAX_LINE_BYTES and not chunk.endswith(b"\n")
        while too_long and chunk and not chunk.endswith(b"\n"):
            chunk = stream.readline(MAX_LINE_BYTES)
            total += len(chunk)
            if total > max_bytes:
                raise ImportTooLarge(limit=max_bytes)
        if total > max_bytes:
            raise ImportTooLarge(limit=max_bytes)
        yield line_number, None if too_long else chunk.rstrip(b"\r\n")


def _lines_staged(*, stream: IO[bytes], max_bytes: int) -> Iterator[StagedLine]:
    """The file's lines as they are staged: blank lines left out, and a line that cannot be
    stored as text marked with its problem. For CSV, the header line is yielded first."""
    for line_number, data in _lines_read(stream=stream, max_bytes=max_bytes):
        if data is None:
            yield StagedLine(line_number, "", f"The line is longer than {MAX_LINE_BYTES} bytes.")
            continue
        if line_number == 1 and data.startswith(b"\xef\xbb\xbf"):  # a byte order mark, as spreadsheets write
            data = data[3:]
        if not data.strip():
            continue
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            yield StagedLine(line_number, "", f"The line is not UTF-8 text (byte {error.start + 1}).")
            continue
        if "\x00" in text:
            yield StagedLine(line_number, "", "The line contains a NUL character.")
            continue
        yield StagedLine(line_number, text)


def csv_header_parse(*, line: StagedLine) -> list[str]:
    """The CSV header's column names; raises ImportRefused for an unknown or missing column."""
    if line.problem:
        raise ImportRefused(field="header", message=f"Line {line.line_number}: {line.problem}")
    columns = [name.strip() for name in next(csv.reader([line.raw]))]
    unknown = [name for name in columns if name not in CSV_COLUMNS and name not in IGNORED_FIELDS]
    if unknown:
        raise ImportRefused(
            field="header",
            message=f"Unknown column '{unknown[0]}' in the CSV header. Columns are: {', '.join(CSV_COLUMNS)}.",
        )
    duplicated = [name for name in columns if columns.count(name) > 1]
    if duplicated:
        raise ImportRefused(field="header", message=f"The CSV header names '{duplicated[0]}' twice.")
    if "external_id" not in columns:
        raise ImportRefused(
            field="header", message="The CSV header has no external_id column; the first line must name the columns."
        )
    return columns


def recipient_import_start(
    *,
    tenant: Tenant,
    file_format: str,
    stream: IO[bytes],
    source: str,
    topic: Topic | None = None,
    max_bytes: int | None = None,
) -> RecipientImport:
    """Stage the stream's lines and queue the import, which subscribes every imported recipient
    to `topic` when one is given; nothing is kept if the upload is refused."""
    if topic is not None and topic.tenant_id != tenant.pk:
        raise ImportRefused(field="topic", message="No such topic.")
    if file_format not in ImportFormat.values:
        raise ImportRefused(field="format", message=f"Give one of: {', '.join(ImportFormat.values)}.")
    max_bytes = settings.NOTIFY_IMPORT_MAX_BYTES if max_bytes is None else max_bytes
    lines = _lines_staged(stream=stream, max_bytes=max_bytes)
    columns: list[str] = []
    if file_format == ImportFormat.CSV:
        header = next(lines, None)
        if header is None:
            raise ImportRefused(field="body", message="The file is empty; a CSV file starts with a header line.")
        columns = csv_header_parse(line=header)
    with transaction.atomic():
        recipient_import = RecipientImport.objects.create(
            tenant=tenant, format=file_format, columns=columns, source=source[:200], topic=topic
        )
        staged = _lines_copy(import_id=recipient_import.id, lines=lines)
        if not staged:
            raise ImportRefused(field="body", message="The file has no recipients in it.")
        recipient_import.rows_total = staged
        recipient_import.save(update_fields=["rows_total"])
        transaction.on_commit(lambda: import_publish(import_id=recipient_import.id))
    return recipient_import


def _lines_copy(*, import_id: UUID, lines: Iterable[StagedLine]) -> int:
    """Write the lines into staging as they are read: COPY on PostgreSQL. Returns the count."""
    count = 0
    if connection.vendor != "postgresql":
        batch: list[RecipientImportLine] = []
        for line in lines:
            count += 1
            batch.append(
                RecipientImportLine(
                    recipient_import_id=import_id, line_number=line.line_number, raw=line.raw, problem=line.problem
                )
            )
            if len(batch) >= STAGE_BATCH:
                RecipientImportLine.objects.bulk_create(batch)
                batch = []
        RecipientImportLine.objects.bulk_create(batch)
        return count
    table = RecipientImportLine._meta.db_table
    with connection.cursor() as cursor:
        # psycopg sends the rows in buffers of a few dozen kilobytes as they are written.
        with cursor.cursor.copy(f"COPY {table} (recipient_import_id, line_number, raw, problem) FROM STDIN") as copy:
            for line in lines:
                count += 1
                copy.write_row((import_id, line.line_number, line.raw, line.problem))
    return count


def import_publish(*, import_id: UUID) -> None:
    """Publish the tasks that process the import side by side, NOTIFY_IMPORT_WORKERS of them
    (published again, they find nothing to claim and end)."""
    for _ in range(settings.NOTIFY_IMPORT_WORKERS):
        current_app.send_task(IMPORT_TASK, args=[str(import_id)], queue=IMPORT_QUEUE)


# --- The worker: validate and upsert in chunks --------------------------------------------


def recipient_import_process(*, import_id: UUID) -> None:
    """Process the import's staged lines chunk by chunk until none are left."""
    try:
        # The last line this worker claimed: where its next claim looks first.
        claimed_up_to = [0]
        while _chunk_process(import_id=import_id, claimed_up_to=claimed_up_to):
            pass
    except DatabaseError:
        raise  # the database failed us: the sweeper publishes the import again later
    except Exception as error:
        logger.exception("recipient import %s failed", import_id)
        RecipientImport.objects.filter(id=import_id).update(
            status=ImportStatus.FAILED, error=f"{type(error).__name__}: {error}"[:500], finished_at=timezone.now()
        )
        _staging_clear(import_id=import_id)
        raise


@retry_lock_conflicts
def _chunk_process(*, import_id: UUID, claimed_up_to: list[int]) -> bool:
    """Claim, validate and upsert the next chunk of staged lines; False when none is left
    to claim. Several workers claim chunks of one import side by side (SKIP LOCKED): the
    staged lines themselves are the cursor, so a killed worker's chunk, rolled back, is
    claimed again."""
    now = timezone.now()
    with transaction.atomic():
        recipient_import = (
            RecipientImport.objects.filter(id=import_id, status__in=[ImportStatus.QUEUED, ImportStatus.RUNNING])
            .only("id", "tenant_id", "format", "columns", "topic_id")
            .first()
        )
        if recipient_import is None:
            return False
        lines = _lines_claim(import_id=import_id, after_line=claimed_up_to[0], windowed=True)
        if not lines:
            # Nothing in this worker's window: lines may be behind it (a killed worker's, given
            # back) or far past it (after many blank lines).
            lines = _lines_claim(import_id=import_id, after_line=0, windowed=False)
        if not lines:
            _import_finish_if_done(import_id=import_id, now=now)
            return False
        parse = _line_parser(recipient_import=recipient_import)
        rows: dict[str, dict[str, Any]] = {}
        refusals: list[tuple[int, str]] = []
        for line_number, raw, problem in lines:
            try:
                if problem:
                    raise RowRefused(problem)
                external_id, fields = parse(raw)
            except RowRefused as refusal:
                refusals.append((line_number, str(refusal)[:500]))
                continue
            # Later lines win, field by field; the chunk then names each recipient once.
            previous = rows.get(external_id)
            rows[external_id] = {**previous, **fields} if previous else fields
        created, updated = _recipients_merge(tenant_id=recipient_import.tenant_id, rows=rows, now=now)
        if recipient_import.topic_id is not None and rows:
            _topic_subscribe(
                topic_id=recipient_import.topic_id, tenant_id=recipient_import.tenant_id, external_ids=list(rows)
            )
        claimed_up_to[0] = max(claimed_up_to[0], lines[-1][0])
        # Locked last, and only until this chunk commits: workers of one import wait on each
        # other only for this short update of the counts.
        counts = RecipientImport.objects.select_for_update().get(id=import_id)
        kept = max(settings.NOTIFY_IMPORT_REFUSALS_KEPT - counts.refused, 0)
        RecipientImportRefusal.objects.bulk_create(
            RecipientImportRefusal(recipient_import_id=import_id, line_number=number, reason=reason)
            for number, reason in refusals[:kept]
        )
        counts.status = ImportStatus.RUNNING
        counts.started_at = counts.started_at or now
        counts.rows_processed += len(lines)
        counts.created += created
        counts.updated += updated
        counts.unchanged += len(rows) - created - updated
        counts.refused += len(refusals)
        counts.heartbeat_at = now
        counts.save()
    return True


def _lines_claim(*, import_id: UUID, after_line: int, windowed: bool) -> list[tuple[int, str, str]]:
    """Take the next chunk of staged lines after `after_line` that no other worker holds: they
    are deleted now, and come back if this transaction rolls back (the worker died). Windowed,
    only the next few chunks' line numbers are searched, so that the database never sorts a
    whole file's lines (it did, planning with statistics from before the upload)."""
    chunk = settings.NOTIFY_IMPORT_CHUNK
    window_end = after_line + chunk * (settings.NOTIFY_IMPORT_WORKERS + 1)
    if connection.vendor != "postgresql":  # the demo's SQLite: one writer at a time anyway
        staged = RecipientImportLine.objects.filter(recipient_import_id=import_id, line_number__gt=after_line)
        if windowed:
            staged = staged.filter(line_number__lte=window_end)
        lines = list(staged.order_by("line_number").values_list("line_number", "raw", "problem")[:chunk])
        RecipientImportLine.objects.filter(
            recipient_import_id=import_id, line_number__in=[line[0] for line in lines]
        ).delete()
        return lines
    table = RecipientImportLine._meta.db_table
    window = "AND line_number <= %s" if windowed else ""
    sql = f"""
        -- By row address: with `line_number IN (...)` and fresh statistics, the planner read
        -- every staged line of the import to find the chunk's, once per chunk.
        DELETE FROM {table} WHERE ctid = ANY(ARRAY(
            SELECT ctid FROM {table}
            WHERE recipient_import_id = %s AND line_number > %s {window}
            ORDER BY line_number LIMIT %s FOR UPDATE SKIP LOCKED
        ))
        RETURNING line_number, raw, problem
    """
    params = [import_id, after_line, *([window_end] if windowed else []), chunk]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return sorted(cursor.fetchall())


def _import_finish_if_done(*, import_id: UUID, now: datetime) -> None:
    """Mark the import completed once no staged line is left (not even one that another
    worker is processing now: that worker finishes it, and the import, after its commit)."""
    if RecipientImportLine.objects.filter(recipient_import_id=import_id).exists():
        return
    finished = RecipientImport.objects.filter(
        id=import_id, status__in=[ImportStatus.QUEUED, ImportStatus.RUNNING]
    ).update(status=ImportStatus.COMPLETED, finished_at=now, heartbeat_at=now)
    created = RecipientImport.objects.filter(id=import_id).values_list("created", flat=True).first() or 0
    if finished and created >= ANALYZE_AFTER_CREATED and connection.vendor == "postgresql":
        # Fresh statistics before the broadcast that often follows: with the table's old
        # row count, the planner reads a whole audience to find one chunk of it.
        with connection.cursor() as cursor:
            cursor.execute(f"ANALYZE {Recipient._meta.db_table}, {TopicMembership._meta.db_table}")


def _staging_clear(*, import_id: UUID) -> None:
    RecipientImportLine.objects.filter(recipient_import_id=import_id).delete()


def recipient_imports_resume(*, now: datetime) -> int:
    """Publish again the unfinished imports that have stopped moving (their worker died)."""
    stalled_before = now - timedelta(seconds=settings.NOTIFY_IMPORT_STALL_SECONDS)
    with transaction.atomic():
        stalled = list(
            RecipientImport.objects.select_for_update(skip_locked=True)
            .filter(status__in=[ImportStatus.QUEUED, ImportStatus.RUNNING], heartbeat_at__lt=stalled_before)
            .values_list("id", flat=True)[:100]
        )
        # Moved on, so that the next sweep does not publish it again before a worker has had time.
        RecipientImport.objects.filter(id__in=stalled).update(heartbeat_at=now)
    for import_id in stalled:
        logger.info("recipient import %s stalled; published again", import_id)
        import_publish(import_id=import_id)
    return len(stalled)


# --- Validation: the API's rules (RecipientSerializer), at bulk speed ------------------------
# The serializer costs about 70 µs a row, more than the whole import budget; these checks
# apply the same rules and messages with the same validators (tests compare the two).


def _text(*, name: str, value: Any, max_length: int, allow_blank: bool = True) -> str:
    if value is None:
        raise RowRefused(f"{name}: This field may not be null.")
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RowRefused(f"{name}: Not a valid string.")
    text = str(value).strip()
    if not text and not allow_blank:
        raise RowRefused(f"{name}: This field may not be blank.")
    if len(text) > max_length:
        raise RowRefused(f"{name}: Ensure this field has no more than {max_length} characters.")
    return text


@lru_cache(maxsize=1024)
def _timezone_problem(name: str) -> str | None:
    try:
        validate_timezone(name)
    except ValidationError as error:
        return error.messages[0]
    return None


def _unstorable(value: Any) -> bool:
    """Text PostgreSQL cannot store: a NUL, or an unpaired surrogate (from a JSON escape)."""
    if isinstance(value, str):
        if "\x00" in value:
            return True
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_unstorable(key) or _unstorable(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_unstorable(item) for item in value)
    return False


def recipient_fields_validate(*, data: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The external id and the given fields of one recipient object, validated and normalised
    as the API does it; raises RowRefused naming the first bad field."""
    if "external_id" not in data:
        raise RowRefused("external_id: This field is required.")
    external_id = _text(name="external_id", value=data["external_id"], max_length=255, allow_blank=False)
    fields: dict[str, Any] = {}
    for name, value in data.items():
        if name == "external_id" or name in IGNORED_FIELDS:
            continue
        if name == "email":
            email = _text(name=name, value=value, max_length=254)
            if email:
                try:
                    validate_email(email)
                except ValidationError:
                    raise RowRefused("email: Enter a valid email address.")
            fields[name] = email
        elif name == "phone":
            phone = _text(name=name, value=value, max_length=32)
            if phone:
                normalised = e164(number=phone)
                if normalised is None:
                    raise RowRefused("phone: Give a valid number in E.164 format, for example +14155550123.")
                phone = normalised
            fields[name] = phone
        elif name == "locale":
            fields[name] = _text(name=name, value=value, max_length=35)
        elif name == "timezone":
            zone = _text(name=name, value=value, max_length=64, allow_blank=False)
            if problem := _timezone_problem(zone):
                raise RowRefused(f"timezone: {problem}")
            fields[name] = zone
        elif name == "attributes":
            if not isinstance(value, dict):
                raise RowRefused(f'attributes: Expected a dictionary of items but got type "{type(value).__name__}".')
            fields[name] = value
        else:
            raise RowRefused(f"Unknown field '{name}'. Fields are: {', '.join(CSV_COLUMNS)}.")
    return external_id, fields


def _ndjson_parse(raw: str) -> tuple[str, dict[str, Any]]:
    try:
        data = json.loads(raw)
    except ValueError as error:
        raise RowRefused(f"Not valid JSON: {error}.")
    if not isinstance(data, dict):
        raise RowRefused("Each line must be a JSON object, with an external_id.")
    # Only a JSON escape can make text that PostgreSQL cannot store; the staged line is clean.
    if "\\u" in raw and _unstorable(data):
        raise RowRefused("Text may not contain NUL characters or unpaired surrogates.")
    return recipient_fields_validate(data=data)


def _csv_parser(*, columns: list[str]) -> Any:
    def parse(raw: str) -> tuple[str, dict[str, Any]]:
        try:
            [values] = csv.reader([raw], strict=True)
        except (csv.Error, ValueError) as error:
            raise RowRefused(f"Not a valid CSV line: {error}.")
        if len(values) != len(columns):
            raise RowRefused(f"The line has {len(values)} fields; the header has {len(columns)}.")
        # An empty cell leaves the field as it is (CSV cannot say "empty" apart from "absent").
        data: dict[str, Any] = {name: value for name, value in zip(columns, values, strict=True) if value != ""}
        if "attributes" in data:
            try:
                data["attributes"] = json.loads(data["attributes"])
            except ValueError:
                raise RowRefused('attributes: Give a JSON object, for example {"plan": "pro"}.')
        return recipient_fields_validate(data=data)

    return parse


def _line_parser(*, recipient_import: RecipientImport) -> Any:
    if recipient_import.format == ImportFormat.CSV:
        return _csv_parser(columns=list(recipient_import.columns))
    return _ndjson_parse


# --- The upsert ---------------------------------------------------------------------------


def _topic_subscribe(*, topic_id: int, tenant_id: UUID, external_ids: list[str]) -> None:
    """Subscribe a chunk's recipients to the import's topic, in the chunk's transaction; those
    already subscribed stay as they are."""
    recipient_ids = Recipient.objects.filter(tenant_id=tenant_id, external_id__in=external_ids).values_list(
        "id", flat=True
    )
    TopicMembership.objects.bulk_create(
        [TopicMembership(topic_id=topic_id, recipient_id=recipient_id) for recipient_id in recipient_ids],
        ignore_conflicts=True,
        batch_size=5000,
    )


def _recipients_merge(*, tenant_id: UUID, rows: dict[str, dict[str, Any]], now: datetime) -> tuple[int, int]:
    """Insert new recipients and update the given fields of existing ones: one statement per
    set of given fields (a file usually has one). Returns (created, updated); a recipient whose
    given fields are unchanged is not rewritten."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for external_id, fields in rows.items():
        field_names = tuple(sorted(fields))
        # A time-ordered id (see Recipient.id), used only if the row is new.
        groups.setdefault(field_names, []).append({"id": str(uuid7()), "external_id": external_id, **fields})
    created = updated = 0
    for field_names, group in groups.items():
        if connection.vendor == "postgresql":
            group_created, group_updated = _recipients_upsert_counted(
                tenant_id=tenant_id, field_names=field_names, rows=group, now=now
            )
        else:  # the demo's SQLite: no counts of what changed, so every existing row counts as updated
            existing = set(
                Recipient.objects.filter(
                    tenant_id=tenant_id, external_id__in=[row["external_id"] for row in group]
                ).values_list("external_id", flat=True)
            )
            Recipient.objects.bulk_create(
                [Recipient(tenant_id=tenant_id, **row) for row in group],
                update_conflicts=True,
                unique_fields=["tenant", "external_id"],
                update_fields=[*field_names, "updated_at"],
            )
            group_created, group_updated = len(group) - len(existing), len(existing)
        created += group_created
        updated += group_updated
    return created, updated


def _recipients_upsert_counted(
    *, tenant_id: UUID, field_names: tuple[str, ...], rows: list[dict[str, Any]], now: datetime
) -> tuple[int, int]:
    """The event ingest's upsert, counting the rows it inserted and updated instead of
    returning them."""
    upsert, params = recipients_upsert_statement(
        tenant_id=tenant_id, field_names=field_names, rows=rows, returning="(r.xmax = 0) AS inserted", now=now
    )
    sql = f"""
        WITH upserted AS ({upsert})
        SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM upserted
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        created, updated = cursor.fetchone()
    return int(created), int(updated)
