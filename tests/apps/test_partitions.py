"""Monthly partitions of notifications, deliveries and their history: the migration from plain
tables on a database with rows in it, the periodic creation of the months ahead, and the
retention purge dropping whole months (apps/deliveries/partitions.py, apps/ops/retention.py)."""

import io
import random
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import IntegrityError, connection, transaction
from django.db.migrations.executor import MigrationExecutor

from apps.catalog.models import Category
from apps.deliveries.models import DeadLetter, Delivery, DeliveryEvent, DeliveryStatus, Event, Notification
from apps.deliveries.partitions import (
    month_next,
    month_start,
    partitions_ensure,
    partitions_list,
    uuid7_floor,
    uuid7_time,
)
from apps.inbox.models import InboxItem
from apps.ops.models import RetentionPolicy
from apps.ops.retention import retention_purge
from apps.recipients.models import Recipient
from apps.tenants.models import Tenant
from notify import tasks
from tests.factories import CategoryFactory, RecipientFactory, TenantFactory

NOTIFICATIONS, DELIVERIES, HISTORY = "deliveries_notification", "deliveries_delivery", "deliveries_deliveryevent"
BEFORE = [("deliveries", "0023_delivery_variant")]


def uuid7_at(at: datetime) -> uuid.UUID:
    """A UUIDv7 made at `at`, as uuid6.uuid7() would have made it then."""
    random_bits = random.getrandbits(74)
    value = (int(at.timestamp() * 1000) << 80) | (0x7 << 76) | ((random_bits >> 62) << 64) | (0b10 << 62)
    return uuid.UUID(int=value | (random_bits & ((1 << 62) - 1)))


def uuid4_with_prefix(prefix: int) -> uuid.UUID:
    """A random (version 4) id whose first 48 bits are `prefix`, as an old id may happen to be."""
    return uuid.UUID(int=(prefix << 80) | (uuid.uuid4().int & ((1 << 80) - 1)))


def months_from_now(count: int) -> datetime:
    start = month_start(at=datetime.now(tz=UTC))
    for _ in range(count):
        start = month_next(start=start)
    return start


def partition_of(table: str, key: str, value: uuid.UUID) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT tableoid::regclass::text FROM {table} WHERE {key} = %s", [value])
        return cursor.fetchone()[0]


def migrate(targets: list[tuple[str, str]]) -> None:
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(targets)


def leaf_nodes() -> list[tuple[str, str]]:
    return MigrationExecutor(connection).loader.graph.leaf_nodes()


class World:
    """One tenant's category, recipient and event, to hang rows of any age on."""

    def __init__(self, tenant: Tenant | None = None) -> None:
        self.tenant = tenant or TenantFactory()
        self.category: Category = CategoryFactory(tenant=self.tenant)
        self.recipient: Recipient = RecipientFactory(tenant=self.tenant)
        self.event = Event.objects.create(tenant=self.tenant, category=self.category, request_digest="x")

    def notification(self, *, at: datetime, id: uuid.UUID | None = None) -> Notification:
        notification = Notification.objects.create(
            id=id or uuid7_at(at),
            tenant=self.tenant,
            event=self.event,
            recipient=self.recipient,
            category=self.category,
            template_version=self.category.template.versions.get(),
            priority="normal",
        )
        Notification.objects.filter(id=notification.id).update(created_at=at)
        return notification

    def delivery(
        self,
        *,
        notification: Notification,
        at: datetime,
        status: str = DeliveryStatus.DELIVERED,
        id: uuid.UUID | None = None,
    ) -> Delivery:
        delivery = Delivery.objects.create(
            id=id or uuid7_at(at),
            notification=notification,
            channel="email",
            priority="normal",
            status=status,
            next_attempt_at=at,
        )
        DeliveryEvent.objects.create(delivery=delivery, status=status, created_at=at)
        return delivery


@pytest.mark.django_db(transaction=True)
def test_the_migration_partitions_a_populated_database_and_keeps_its_rows_and_keys():
    this_month = months_from_now(0)
    far_month = months_from_now(10)  # no partition yet: its old random ids land in the default
    try:
        migrate(BEFORE)
        world = World()
        rows = {
            "old time-ordered": this_month - timedelta(days=3),
            "this month": this_month + timedelta(hours=1),
        }
        made = {}
        for name, at in rows.items():
            notification = world.notification(at=at)
            made[name] = (notification, world.delivery(notification=notification, at=at))
        random_ids = {
            "random low": uuid4_with_prefix(0x0000_1234_5678),
            "random high": uuid4_with_prefix(0xFFFF_1234_5678),
            "random among the months": uuid4_with_prefix(uuid7_floor(at=far_month + timedelta(days=9)).int >> 80),
        }
        for name, value in random_ids.items():
            notification = world.notification(at=this_month - timedelta(days=40), id=value)
            made[name] = (notification, world.delivery(notification=notification, at=this_month, id=value))
        DeadLetter.objects.create(delivery=made["this month"][1], channel="email", reason="x", attempts=3)
        InboxItem.objects.create(recipient=world.recipient, delivery=made["random low"][1], title="hello")
        last_history_id = DeliveryEvent.objects.order_by("-id").values_list("id", flat=True)[0]

        migrate(leaf_nodes())

        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT relname, relkind FROM pg_class WHERE relname = ANY(%s)", [[NOTIFICATIONS, DELIVERIES, HISTORY]]
            )
            assert dict(cursor.fetchall()) == {NOTIFICATIONS: "p", DELIVERIES: "p", HISTORY: "p"}
        assert Notification.objects.count() == Delivery.objects.count() == DeliveryEvent.objects.count() == 5
        expected = {
            "old time-ordered": "before",
            "this month": f"p{this_month:%Y_%m}",
            "random low": "before",
            "random high": "beyond",
            "random among the months": "default",
        }
        for name, suffix in expected.items():
            notification, delivery = made[name]
            assert partition_of(NOTIFICATIONS, "id", notification.id) == f"{NOTIFICATIONS}_{suffix}", name
            assert partition_of(DELIVERIES, "id", delivery.id) == f"{DELIVERIES}_{suffix}", name
            assert partition_of(HISTORY, "delivery_id", delivery.id) == f"{HISTORY}_{suffix}", name
        # The months ahead exist, and rows made now go to this month's partition.
        names = {p.name for p in partitions_list(table=DELIVERIES)[0]}
        assert {f"{DELIVERIES}_p{months_from_now(n):%Y_%m}" for n in range(4)} <= names
        fresh = world.delivery(notification=made["this month"][0], at=datetime.now(tz=UTC))
        assert partition_of(DELIVERIES, "id", fresh.id) == f"{DELIVERIES}_p{this_month:%Y_%m}"
        # The history's ids go on from the last one.
        assert DeliveryEvent.objects.get(delivery=fresh).id > last_history_id
        # The relations into the partitioned tables hold, kept by the code rather than checked
        # by the database (deliveries.0025); the keys out of them are still checked.
        assert DeadLetter.objects.get().delivery_id == made["this month"][1].id
        assert InboxItem.objects.get().delivery.notification_id == made["random low"][0].id
        with connection.cursor() as cursor:
            # Neither the tables nor any of their partitions.
            cursor.execute(
                """SELECT conrelid::regclass::text FROM pg_constraint WHERE contype = 'f' AND (
                    confrelid = ANY(%(parents)s::regclass[])
                    OR confrelid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = ANY(%(parents)s::regclass[])))""",
                {"parents": [NOTIFICATIONS, DELIVERIES, HISTORY]},
            )
            assert cursor.fetchall() == []
        with pytest.raises(IntegrityError), transaction.atomic():
            Notification.objects.filter(id=made["this month"][0].id).update(recipient_id=uuid.uuid4())
        # A month made later around the old random id in its range leaves that row where it is.
        created = partitions_ensure(now=far_month, months_ahead=0)
        assert sorted(created) == sorted(
            f"{table}_p{far_month:%Y_%m}_{index}" for table in (NOTIFICATIONS, DELIVERIES, HISTORY) for index in (0, 1)
        )
        assert partition_of(NOTIFICATIONS, "id", random_ids["random among the months"]) == f"{NOTIFICATIONS}_default"
        late = world.notification(at=far_month + timedelta(days=20))
        assert partition_of(NOTIFICATIONS, "id", late.id) == f"{NOTIFICATIONS}_p{far_month:%Y_%m}_1"
    finally:
        # Back to plain tables and forward again: the next tests get the usual months.
        migrate(BEFORE)
        migrate(leaf_nodes())


def test_the_periodic_task_creates_the_months_ahead_once(db, settings):
    assert settings.CELERY_BEAT_SCHEDULE["notify-partitions"]["task"] == "notify.partitions_ensure"
    settings.NOTIFY_PARTITION_MONTHS_AHEAD = 6
    # The migration made this month and the next three.
    created = tasks.partitions_ensure()
    assert sorted(created) == sorted(
        f"{table}_p{months_from_now(n):%Y_%m}" for table in (NOTIFICATIONS, DELIVERIES, HISTORY) for n in (4, 5, 6)
    )
    assert tasks.partitions_ensure() == []
    six_months_on = months_from_now(6) + timedelta(days=2)
    world = World()
    notification = world.notification(at=six_months_on)
    assert partition_of(NOTIFICATIONS, "id", notification.id) == f"{NOTIFICATIONS}_p{six_months_on:%Y_%m}"
    [month] = [p for p in partitions_list(table=NOTIFICATIONS)[0] if p.name.endswith(f"p{six_months_on:%Y_%m}")]
    assert (month.lower, month.upper) == (
        uuid7_floor(at=months_from_now(6)),
        uuid7_floor(at=months_from_now(7)),
    )
    assert uuid7_time(value=month.lower) == months_from_now(6)


@pytest.fixture
def two_months_ahead(transactional_db: None) -> Iterator[tuple[datetime, datetime]]:
    """Two months far enough ahead to be this test's own, with their partitions; what is
    left of them goes afterwards."""
    first, second = months_from_now(7), months_from_now(8)
    partitions_ensure(now=first, months_ahead=1)
    yield first, second
    DeliveryEvent.objects.filter(delivery_id__gte=uuid7_floor(at=first)).delete()
    DeadLetter.objects.all().delete()
    Delivery.objects.filter(id__gte=uuid7_floor(at=first)).delete()
    Notification.objects.filter(id__gte=uuid7_floor(at=first)).delete()
    with connection.cursor() as cursor:
        for table in (HISTORY, DELIVERIES, NOTIFICATIONS):
            for month in (first, second):
                cursor.execute("SELECT to_regclass(%s)", [f"{table}_p{month:%Y_%m}"])
                if cursor.fetchone()[0]:
                    cursor.execute(f"ALTER TABLE {table} DETACH PARTITION {table}_p{month:%Y_%m}")
                    cursor.execute(f"DROP TABLE {table}_p{month:%Y_%m}")


def test_retention_drops_an_expired_month_whole_and_deletes_rows_of_the_month_that_straddles(
    two_months_ahead, settings
):
    settings.NOTIFY_RETENTION_PAUSE_SECONDS = 0
    first, second = two_months_ahead
    world = World()
    RetentionPolicy.objects.create(tenant=world.tenant, retention_days=30)
    # No other tenant keeps anything in these months; one kept forever has rows elsewhere only.
    RetentionPolicy.objects.create(tenant=World().tenant, retention_days=None)
    expired = [world.notification(at=first + timedelta(days=day)) for day in (1, 10, 27)]
    for notification in expired:
        delivery = world.delivery(notification=notification, at=first + timedelta(days=1))
    DeadLetter.objects.create(delivery=delivery, channel="email", reason="x", attempts=3)
    # Near the edge: a notification of the first month's last second, its delivery (with its
    # history) made in the second month.
    edge = world.notification(at=second - timedelta(seconds=1))
    edge_delivery = world.delivery(notification=edge, at=second + timedelta(seconds=1))
    straddling_old = world.notification(at=second + timedelta(days=2))
    world.delivery(notification=straddling_old, at=second + timedelta(days=2))
    straddling_new = world.notification(at=second + timedelta(days=20))
    world.delivery(notification=straddling_new, at=second + timedelta(days=20))
    now = second + timedelta(days=10 + 30)  # the cutoff falls on the second month's 11th day

    report = retention_purge(now=now)

    assert report.partitions == [f"{NOTIFICATIONS}_p{first:%Y_%m}"]
    for table in (NOTIFICATIONS, DELIVERIES, HISTORY):
        names = {p.name for p in partitions_list(table=table)[0]}
        assert f"{table}_p{first:%Y_%m}" not in names and f"{table}_p{second:%Y_%m}" in names
    # The month that straddles the cutoff lost its expired rows one by one.
    assert report.notifications == 1 and report.deliveries == 1
    assert set(Notification.objects.filter(id__gte=uuid7_floor(at=first))) == {straddling_new}
    assert not Delivery.objects.filter(id=edge_delivery.id).exists()
    assert not DeliveryEvent.objects.filter(delivery_id=edge_delivery.id).exists()
    assert not DeadLetter.objects.exists()
    assert Delivery.objects.filter(notification=straddling_new).count() == 1
    assert DeliveryEvent.objects.filter(delivery__notification=straddling_new).count() == 1


def test_a_month_with_work_in_flight_or_a_tenant_kept_forever_is_not_dropped(two_months_ahead, settings):
    settings.NOTIFY_RETENTION_PAUSE_SECONDS = 0
    first, second = two_months_ahead
    world, forever = World(), World()
    RetentionPolicy.objects.create(tenant=world.tenant, retention_days=30)
    RetentionPolicy.objects.create(tenant=forever.tenant, retention_days=None)
    done = world.notification(at=first + timedelta(days=1))
    world.delivery(notification=done, at=first + timedelta(days=1))
    waiting = world.notification(at=first + timedelta(days=2))
    world.delivery(notification=waiting, at=first + timedelta(days=2), status=DeliveryStatus.RETRYING)
    kept = forever.notification(at=first + timedelta(days=3))
    forever.delivery(notification=kept, at=first + timedelta(days=3))
    now = second + timedelta(days=40)

    report = retention_purge(now=now)

    # The month stays; its expired rows go one by one, the rest stay.
    assert report.partitions == []
    assert f"{NOTIFICATIONS}_p{first:%Y_%m}" in {p.name for p in partitions_list(table=NOTIFICATIONS)[0]}
    assert set(Notification.objects.filter(id__gte=uuid7_floor(at=first))) == {waiting, kept}
    # Once the forever tenant's row and the work in flight are gone, the month goes whole.
    Delivery.objects.filter(notification=waiting).update(status=DeliveryStatus.SENT)
    RetentionPolicy.objects.filter(tenant=forever.tenant).update(retention_days=30)
    assert retention_purge(now=now).partitions == [f"{NOTIFICATIONS}_p{first:%Y_%m}"]
    assert not Notification.objects.filter(id__gte=uuid7_floor(at=first)).exists()


def test_without_partitions_the_purge_deletes_the_same_rows_in_batches(two_months_ahead, settings):
    settings.NOTIFY_RETENTION_PAUSE_SECONDS = 0
    first, second = two_months_ahead
    world = World()
    RetentionPolicy.objects.create(tenant=world.tenant, retention_days=30)
    for day in (1, 2):
        notification = world.notification(at=first + timedelta(days=day))
        world.delivery(notification=notification, at=first + timedelta(days=day))

    report = retention_purge(now=second + timedelta(days=40), partitions=False)

    assert (report.partitions, report.notifications, report.deliveries) == ([], 2, 2)
    assert f"{NOTIFICATIONS}_p{first:%Y_%m}" in {p.name for p in partitions_list(table=NOTIFICATIONS)[0]}
    assert not DeliveryEvent.objects.filter(delivery_id__gte=uuid7_floor(at=first)).exists()


def test_orphans_check_finds_a_row_naming_a_delivery_that_does_not_exist(db):
    world = World()
    at = datetime.now(tz=UTC)
    delivery = world.delivery(notification=world.notification(at=at), at=at)
    DeadLetter.objects.create(delivery=delivery, channel="email", reason="x", attempts=3)
    out = io.StringIO()
    call_command("orphans_check", stdout=out)
    # Every key PostgreSQL does not check is, and none names a missing row.
    assert sorted(line.split(":")[0] for line in out.getvalue().splitlines()) == [
        "audiences_broadcastrecipient.broadcast_id",
        "deliveries_deadletter.delivery_id",
        "deliveries_delivery.notification_id",
        "deliveries_deliveryevent.delivery_id",
        "deliveries_earlyfeedback.delivery_id",
        "deliveries_notification.category_id",
        "deliveries_notification.template_version_id",
        "deliveries_notification.tenant_id",
        "inbox_inboxitem.delivery_id",
        "ops_canaryrun.delivery_id",
    ]
    assert " 0 orphans" in out.getvalue()
    DeadLetter.objects.create(delivery_id=uuid.uuid4(), channel="email", reason="x", attempts=1)
    with pytest.raises(CommandError, match=r"deliveries_deadletter\.delivery_id \(1\)"):
        call_command("orphans_check", stdout=io.StringIO())
    # A notification's tenant, category and version are its event's, whose keys are checked
    # (deliveries.0026): the check finds one that names a missing category...
    Notification.objects.filter(id=delivery.notification_id).update(category_id=2**31 - 1)
    with pytest.raises(CommandError, match=r"deliveries_notification\.category_id \(1\)"):
        call_command("orphans_check", stdout=io.StringIO())
    # ...while PostgreSQL still refuses a missing event or recipient.
    for column in ("event_id", "recipient_id"):
        with pytest.raises(IntegrityError), transaction.atomic():
            Notification.objects.filter(id=delivery.notification_id).update(**{column: uuid.uuid4()})
            connection.check_constraints()  # the keys are deferred: check them now, not at commit
