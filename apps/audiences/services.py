"""Writes to topics: subscribe and unsubscribe recipients in bulk."""

from apps.audiences.models import Topic, TopicMembership
from apps.tenants.models import Tenant
from notify.pipeline.ingest import RecipientRef, recipients_resolve


def topic_subscribe(*, tenant: Tenant, topic: Topic, refs: list[RecipientRef]) -> int:
    """Add the recipients (upserting inline ones) to the topic; return how many were new to it."""
    recipients = recipients_resolve(tenant=tenant, refs=refs)
    members = TopicMembership.objects.filter(topic=topic, recipient_id__in=[r.id for r in recipients])
    # bulk_create with ignore_conflicts cannot tell which rows were new: count around it.
    before = members.count()
    TopicMembership.objects.bulk_create(
        [TopicMembership(topic=topic, recipient_id=recipient.id) for recipient in recipients],
        ignore_conflicts=True,
        batch_size=2000,
    )
    return members.count() - before


def topic_unsubscribe(*, tenant: Tenant, topic: Topic, external_ids: list[str]) -> int:
    """Remove the recipients with these external ids from the topic; return how many were in it."""
    deleted, _ = TopicMembership.objects.filter(
        topic=topic, recipient__tenant=tenant, recipient__external_id__in=external_ids
    ).delete()
    return deleted
