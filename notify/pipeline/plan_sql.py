"""Planning a broadcast's chunk in the database: the decisions notifications_plan() makes for
each recipient (locale, send time, one delivery per channel, suppressed where the channel has
no address for the person or the address is on the suppression list, and the first history
row), made by one INSERT ... SELECT from the recipient rows, with no Python work per person.

PostgreSQL only. Categories whose planning depends on more than a recipient row says are
planned by notifications_plan() instead: fallback routing (each person's own channel order)
and escalations. So is any category on a channel that cannot state its address in SQL."""

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.conf import settings
from django.db import connection

from apps.audiences.models import Broadcast
from apps.catalog.models import Category, Routing
from apps.deliveries.models import Delivery, DeliveryEvent, DeliveryStatus, Notification
from apps.recipients.models import Recipient, Suppression
from notify.channels import channel_get
from notify.pipeline.dispatch import ids_publish_on_commit
from notify.pipeline.plan import LocalSendTime, plan_channels
from notify.policy.suppression import suppressed_addresses

# A UUIDv7, as uuid6.uuid7() makes them for these tables: the millisecond clock, then random
# bits, with the version and variant set (PostgreSQL 15 has no uuidv7()).
UUID7_SQL = (
    "encode(set_bit(set_bit(overlay(uuid_send(gen_random_uuid()) placing"
    " substring(int8send((extract(epoch from clock_timestamp()) * 1000)::bigint) from 3)"
    " from 1 for 6), 52, 1), 53, 1), 'hex')::uuid"
)


def _iso_sql(column: str) -> str:
    """datetime.isoformat() of a UTC timestamp, as planning writes it into a history reason."""
    utc = f"({column} AT TIME ZONE 'UTC')"
    return (
        f"to_char({utc}, 'YYYY-MM-DD\"T\"HH24:MI:SS')"
        f" || CASE WHEN mod(extract(microseconds FROM {utc})::int, 1000000) <> 0"
        f" THEN to_char({utc}, '.US') ELSE '' END || '+00:00'"
    )


def sql_plannable(*, category: Category) -> bool:
    """Whether a broadcast of this category can be planned in the database."""
    if connection.vendor != "postgresql" or category.routing == Routing.FALLBACK:
        return False
    if category.escalate_after and category.escalate_to:
        return False
    return all(channel_get(name=name).address_sql(recipient="r") is not None for name in category.default_channels)


@dataclass(frozen=True)
class PlannedChunk:
    notifications: int
    published: int


def chunk_plan_sql(
    *,
    broadcast: Broadcast,
    recipient_ids: list[str],
    rate: int | None,
    start: datetime,
    position: int,
    now: datetime,
) -> PlannedChunk:
    """Plan the broadcast's notification for each of these (newly reached) recipients, in
    one statement, and publish the due deliveries once the transaction commits. A paced
    broadcast places them in time after the `position` audience members claimed before."""
    if not recipient_ids:
        return PlannedChunk(notifications=0, published=0)
    category = broadcast.category
    channels, _ = plan_channels(category=category, version=broadcast.template_version, channels_override=None)
    ids = "{" + ",".join(recipient_ids) + "}"
    params: dict[str, Any] = {
        "ids": ids,
        "tenant": broadcast.tenant_id,
        "event": broadcast.event_id,
        "category": category.pk,
        "version": broadcast.template_version_id,
        "tenant_locale": broadcast.event.tenant.default_locale,
        "priority": category.default_priority,
        "now": now,
        "countdown_max": settings.NOTIFY_COUNTDOWN_MAX_SECONDS,
    }
    # When each is due: the broadcast's send_at, one second's worth after another from the
    # start when paced, or the next local time in each recipient's timezone.
    if rate is not None:
        params.update(start=start, rate=rate, position=position)
        send_at = (
            "%(start)s::timestamptz"
            " + ((%(position)s::bigint + row_number() OVER (ORDER BY r.id) - 1) / %(rate)s::bigint)"
            " * interval '1 second'"
        )
    else:
        params["send_at"] = broadcast.send_at
        send_at = "%(send_at)s::timestamptz"
    due_at = "GREATEST(send_at, %(now)s)"  # GREATEST skips a NULL send_at: due now
    if broadcast.send_at_local:
        local = LocalSendTime.parse(broadcast.send_at_local)
        params.update(clock=local.clock, day=local.day)
        day = "COALESCE(%(day)s::date, (%(now)s::timestamptz AT TIME ZONE zone)::date)"
        due_local = f"(({day} + %(clock)s::time) AT TIME ZONE zone)"
        next_local = f"(({day} + 1 + %(clock)s::time) AT TIME ZONE zone)"
        due_at = (
            f"GREATEST(CASE WHEN %(day)s::date IS NULL AND {due_local} <= %(now)s THEN {next_local}"
            f" ELSE {due_local} END, %(now)s)"
        )
    unavailable = []
    suppressed_joins = []
    for index, name in enumerate(channels):
        address = channel_get(name=name).address_sql(recipient="r")
        params[f"channel_{index}"] = name
        params[f"no_address_{index}"] = f"recipient has no {name} address"
        reason = f"WHEN COALESCE({address}, '') = '' THEN %(no_address_{index})s"
        suppressed = _suppressed_reasons(broadcast=broadcast, channel=name, address=address, ids=ids)
        if suppressed:
            params[f"suppressed_ids_{index}"] = "{" + ",".join(suppressed) + "}"
            params[f"suppressed_reasons_{index}"] = list(suppressed.values())
            suppressed_joins.append(
                f"LEFT JOIN unnest(%(suppressed_ids_{index})s::uuid[], %(suppressed_reasons_{index})s::text[])"
                f" AS suppressed_{index}(recipient_id, reason) ON suppressed_{index}.recipient_id = r.id"
            )
            reason += f" WHEN suppressed_{index}.reason IS NOT NULL THEN 'address is suppressed: ' || suppressed_{index}.reason"
        unavailable.append(f"left(CASE {reason} ELSE '' END, 500) AS unavailable_{index}")
    per_channel = ", ".join(f"(%(channel_{i})s, unavailable_{i})" for i in range(len(channels)))
    sql = f"""
        WITH chosen AS MATERIALIZED (
            SELECT r.id AS recipient_id,
                   COALESCE(NULLIF(r.locale, ''), %(tenant_locale)s) AS locale,
                   COALESCE(NULLIF(r.timezone, ''), 'UTC') AS zone,
                   {send_at} AS send_at,
                   {", ".join(unavailable)}
            FROM {Recipient._meta.db_table} r {" ".join(suppressed_joins)}
            WHERE r.id = ANY(%(ids)s::uuid[])
        ),
        planned AS MATERIALIZED (
            SELECT chosen.*, {UUID7_SQL} AS notification_id, {due_at} AS due_at FROM chosen
        ),
        notifications AS (
            INSERT INTO {Notification._meta.db_table}
                (id, tenant_id, event_id, recipient_id, category_id, template_version_id, locale, priority,
                 send_at, created_at, cancelled_at)
            SELECT notification_id, %(tenant)s, %(event)s, recipient_id, %(category)s, %(version)s, locale,
                   %(priority)s, {"due_at" if broadcast.send_at_local else "send_at"}, %(now)s, NULL
            FROM planned
        ),
        deliveries AS (
            INSERT INTO {Delivery._meta.db_table}
                (id, notification_id, channel, priority, status, status_reason, attempt_count, next_attempt_at,
                 published_at, lease_token, lease_expires_at, provider_message_id, in_doubt_since,
                 resend_round, segments, sent_at, updated_at, step, escalation)
            SELECT {UUID7_SQL}, planned.notification_id, channel.name, %(priority)s,
                   CASE WHEN channel.unavailable = '' THEN '{DeliveryStatus.QUEUED}'
                        ELSE '{DeliveryStatus.SUPPRESSED}' END,
                   channel.unavailable, 0, planned.due_at,
                   CASE WHEN channel.unavailable = ''
                         AND planned.due_at <= %(now)s + %(countdown_max)s * interval '1 second'
                        THEN planned.due_at END,
                   NULL, NULL, '', NULL, 0, NULL, NULL, %(now)s, NULL, false
            FROM planned CROSS JOIN LATERAL (VALUES {per_channel}) AS channel(name, unavailable)
            RETURNING id, channel, status, status_reason, next_attempt_at, published_at
        ),
        history AS (
            INSERT INTO {DeliveryEvent._meta.db_table} (delivery_id, status, reason, attempt, detail, created_at)
            SELECT id, status,
                   CASE WHEN status = '{DeliveryStatus.SUPPRESSED}' THEN status_reason
                        WHEN next_attempt_at > %(now)s THEN left('scheduled for ' || {_iso_sql("next_attempt_at")}, 500)
                        ELSE 'planned' END,
                   0, '{{}}'::jsonb, %(now)s
            FROM deliveries
        )
        SELECT channel, next_attempt_at, array_agg(id::text)
        FROM deliveries WHERE published_at IS NOT NULL GROUP BY channel, next_attempt_at
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        groups = cursor.fetchall()
    published = 0
    for channel, due, delivery_ids in groups:
        ids_publish_on_commit(
            channel=channel,
            priority=category.default_priority,
            delivery_ids=delivery_ids,
            countdown=max((due - now).total_seconds(), 0.0),
        )
        published += len(delivery_ids)
    return PlannedChunk(notifications=len(recipient_ids), published=published)


def _suppressed_reasons(*, broadcast: Broadcast, channel: str, address: str | None, ids: str) -> dict[str, str]:
    """The chunk's recipients whose address on the channel is suppressed, with the reason, by
    recipient id. Only a tenant with suppressions on the channel pays for it: suppressed
    addresses are compared in canonical form and, once erased, as a keyed hash, which
    suppressed_addresses() knows how to do."""
    if not Suppression.objects.filter(tenant_id=broadcast.tenant_id, channel=channel).exists():
        return {}
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT r.id::text, {address} FROM {Recipient._meta.db_table} r"
            f" WHERE r.id = ANY(%s::uuid[]) AND COALESCE({address}, '') <> ''",
            [ids],
        )
        addresses = dict(cursor.fetchall())
    reasons = suppressed_addresses(tenant_id=broadcast.tenant_id, channel=channel, addresses=addresses.values())
    return {recipient_id: reasons[address] for recipient_id, address in addresses.items() if address in reasons}
