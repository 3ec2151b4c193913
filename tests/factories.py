import uuid
from dataclasses import dataclass

import factory
from django.contrib.auth.models import Permission, User
from django.db import models
from django.utils import timezone

from apps.audiences.models import Broadcast, Segment, Topic, TopicMembership
from apps.catalog.models import Category, CategoryKind, Priority, Template, TemplateVariant, TemplateVersion
from apps.deliveries.models import (
    ChannelSwitch,
    DeadLetter,
    Delivery,
    DeliveryEvent,
    DeliveryStatus,
    Digest,
    Event,
    Notification,
    Provider,
    RecurringSend,
)
from apps.inbox.models import InboxItem
from apps.ops.audit import Actor, audit_record
from apps.ops.models import RetentionPolicy
from apps.recipients.models import (
    Consent,
    Device,
    PreferenceSet,
    Recipient,
    RecipientImport,
    Suppression,
    WebPushSubscription,
)
from apps.tenants.models import ALL_SCOPES, ApiKey, StaffMembership, Tenant
from apps.webhooks.models import WebhookEndpoint, WebhookMessage
from notify.pipeline.recurring import recurring_send_save


class TenantFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Tenant

    slug = factory.Sequence(lambda n: f"tenant-{n}")
    name = factory.Sequence(lambda n: f"Tenant {n}")


class ApiKeyFactory(factory.django.DjangoModelFactory):
    """`ApiKeyFactory()` returns the saved key; its raw form is on `.raw_key`."""

    class Meta:
        model = ApiKey

    tenant = factory.SubFactory(TenantFactory)
    name = "test key"
    scopes = factory.LazyFunction(lambda: list(ALL_SCOPES))  # tests of one scope pass their own

    @classmethod
    def _create(cls, model_class, *args, **kwargs):  # type: ignore[no-untyped-def]
        key = model_class(*args, **kwargs)
        key.raw_key = key.assign_secret()
        key.save()
        return key


class TemplateFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Template

    tenant = factory.SubFactory(TenantFactory)
    key = factory.Sequence(lambda n: f"template-{n}")
    name = factory.LazyAttribute(lambda t: t.key)


def template_with_email(*, tenant: Tenant, key: str, variants: dict[str, dict[str, str]] | None = None) -> Template:
    """A template with one version holding an email variant per locale ("" = default)."""
    template = TemplateFactory(tenant=tenant, key=key)
    version = TemplateVersion.objects.create(template=template, number=1)
    for locale, fields in (
        variants or {"": {"subject": "Hello {{ data.name }}", "body": "Hi {{ data.name }}"}}
    ).items():
        TemplateVariant.objects.create(version=version, channel="email", locale=locale, **fields)
    return template


class CategoryFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Category

    tenant = factory.SubFactory(TenantFactory)
    key = factory.Sequence(lambda n: f"category-{n}")
    kind = CategoryKind.TRANSACTIONAL
    default_channels = factory.LazyFunction(lambda: ["email"])
    default_priority = Priority.NORMAL
    template = factory.LazyAttribute(lambda c: template_with_email(tenant=c.tenant, key=c.key))


class RecipientFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Recipient

    tenant = factory.SubFactory(TenantFactory)
    external_id = factory.Sequence(lambda n: f"user-{n}")
    email = factory.LazyAttribute(lambda r: f"{r.external_id}@example.com")
    locale = "en"


class StaffUserFactory(factory.django.DjangoModelFactory):
    """A staff user (not a superuser) whose password is `.raw_password`; pass `tenant=` to
    make them that tenant's staff and `permissions=[...]` ("app_label.codename") to grant some."""

    class Meta:
        model = User
        skip_postgeneration_save = True

    username = factory.Sequence(lambda n: f"staff-{n}")
    email = factory.LazyAttribute(lambda u: f"{u.username}@staff.example")
    is_staff = True

    @factory.post_generation
    def raw_password(user, create, extracted, **kwargs):  # type: ignore[no-untyped-def]
        user.raw_password = extracted or f"correct horse {user.username} battery"
        user.set_password(user.raw_password)
        user.save()

    @factory.post_generation
    def tenant(user, create, extracted, **kwargs):  # type: ignore[no-untyped-def]
        if extracted is not None:
            StaffMembership.objects.create(user=user, tenant=extracted)

    @factory.post_generation
    def permissions(user, create, extracted, **kwargs):  # type: ignore[no-untyped-def]
        for name in extracted or []:
            app_label, codename = name.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))


@dataclass
class TenantWorld:
    """One tenant with one of every kind of object it owns, for the isolation tests."""

    tenant: Tenant
    api_key: ApiKey
    staff: User
    recipient: Recipient
    objects: list[models.Model]
    # Strings that identify this tenant's data and appear nowhere else.
    secrets: set[str]

    def of_model(self, model: type[models.Model]) -> list[models.Model]:
        return [obj for obj in self.objects if type(obj) is model]


def tenant_world(*, tag: str) -> TenantWorld:
    """A tenant whose every identifying string starts with `tag`."""
    now = timezone.now()
    phone = "+1555" + "".join(str(ord(letter) % 10) for letter in tag).ljust(7, "0")[:7]
    tenant = TenantFactory(slug=f"{tag}-tenant", name=f"{tag} Tenant Inc")
    api_key = ApiKeyFactory(tenant=tenant, name=f"{tag}-key")
    staff = StaffUserFactory(username=f"{tag}-staff", tenant=tenant)
    inapp_template = TemplateFactory(tenant=tenant, key=f"{tag}-inapp-template", name=f"{tag} in-app template")
    inapp_version = TemplateVersion.objects.create(template=inapp_template, number=1, note=f"{tag} first version")
    variant = TemplateVariant.objects.create(
        version=inapp_version, channel="inapp", title=f"{tag} variant title", body=f"{tag} variant body"
    )
    category = CategoryFactory(
        tenant=tenant, key=f"{tag}-category", template=inapp_template, default_channels=["inapp"]
    )
    email_category = CategoryFactory(tenant=tenant, key=f"{tag}-email-category")
    recipient = RecipientFactory(
        tenant=tenant, external_id=f"{tag}-person", email=f"{tag}-person@{tag}.example", phone=phone
    )
    preferences = PreferenceSet.objects.create(recipient=recipient, channels={"sms": False})
    consent = Consent.objects.create(
        tenant=tenant, recipient=recipient, channel="email", granted=True, source=f"{tag} signup form"
    )
    device = Device.objects.create(tenant=tenant, recipient=recipient, platform="android", token=f"{tag}-device-token")
    subscription = WebPushSubscription.objects.create(
        tenant=tenant,
        recipient=recipient,
        endpoint=f"https://push.example/{tag}-endpoint",
        p256dh=f"{tag}-p256dh-key",
        auth=f"{tag}-auth-secret",
    )
    suppression = Suppression.objects.create(
        tenant=tenant, channel="email", address=f"{tag}-bounced@{tag}.example", reason=f"{tag} hard bounce", source="t"
    )
    event = Event.objects.create(
        tenant=tenant, api_key=api_key, category=category, idempotency_key=f"{tag}-idempotency", request_digest="0"
    )
    notification = Notification.objects.create(
        tenant=tenant,
        event=event,
        recipient=recipient,
        category=category,
        template_version=inapp_version,
        priority="normal",
    )
    delivery = Delivery.objects.create(
        notification=notification,
        channel="inapp",
        priority="normal",
        status=DeliveryStatus.SENT,
        next_attempt_at=now,
        provider_message_id=f"{tag}-provider-message",
    )
    history = DeliveryEvent.objects.create(
        delivery=delivery, status=DeliveryStatus.SENT, reason=f"{tag} stored in the inbox", created_at=now
    )
    dead_delivery = Delivery.objects.create(
        notification=notification, channel="email", priority="normal", status=DeliveryStatus.DEAD, next_attempt_at=now
    )
    dead_letter = DeadLetter.objects.create(
        delivery=dead_delivery, channel="email", reason=f"{tag} mailbox full", attempts=5
    )
    inbox_item = InboxItem.objects.create(
        recipient=recipient, delivery=delivery, title=f"{tag} inbox title", body=f"{tag} inbox body"
    )
    digest = Digest.objects.create(tenant=tenant, recipient=recipient, category=email_category, due_at=now)
    recurring = recurring_send_save(
        recurring=RecurringSend(
            tenant=tenant,
            name=f"{tag}-weekly",
            category=email_category,
            recipients=[recipient.external_id],
            cron="0 9 * * 1",
        )
    )
    provider = Provider.objects.create(
        tenant=tenant,
        name=f"{tag}-postmark",
        channel="email",
        config={"server_token": f"{tag}-server-token", "from_email": f"{tag} <hello@{tag}.example>"},
    )
    switch = ChannelSwitch.objects.create(tenant=tenant, channel="sms", paused=True, reason=f"{tag} paused sms")
    recipient_import = RecipientImport.objects.create(tenant=tenant, format="ndjson", source=f"{tag} import source")
    topic = Topic.objects.create(tenant=tenant, key=f"{tag}-topic", name=f"{tag} topic name")
    membership = TopicMembership.objects.create(topic=topic, recipient=recipient)
    segment = Segment.objects.create(tenant=tenant, key=f"{tag}-segment", name=f"{tag} segment name", filter={})
    broadcast_event = Event.objects.create(
        tenant=tenant, api_key=api_key, category=category, idempotency_key=f"{tag}-broadcast", request_digest="0"
    )
    broadcast = Broadcast.objects.create(
        tenant=tenant,
        event=broadcast_event,
        category=category,
        template_version=inapp_version,
        audience={"topic": topic.key},
        request_digest="0",
        state="paused",
    )
    audit_entry = audit_record(
        actor=Actor(type="staff", id=str(staff.pk), label=staff.username),
        tenant_id=tenant.pk,
        action="update",
        object_type="catalog.Category",
        object_id=f"{tag}-audited-object",
        changes={"name": [None, f"{tag} audited name"]},
    )
    retention = RetentionPolicy.objects.create(tenant=tenant, retention_days=365)
    webhook_endpoint = WebhookEndpoint.objects.create(
        tenant=tenant,
        url=f"https://hooks.example/{tag}-webhook",
        event_types=["delivery.sent"],
        description=f"{tag} webhook endpoint",
        secret=f"whsec_{tag}",
    )
    webhook_message = WebhookMessage.objects.create(
        endpoint=webhook_endpoint,
        tenant=tenant,
        event_type="delivery.sent",
        payload={"type": "delivery.sent", "data": {"recipient": recipient.external_id}},
        next_attempt_at=now,
        created_at=now,
        last_error=f"{tag} webhook failure",
    )
    objects: list[models.Model] = [
        tenant,
        audit_entry,
        retention,
        api_key,
        webhook_endpoint,
        webhook_message,
        provider,
        switch,
        recipient_import,
        topic,
        membership,
        segment,
        broadcast_event,
        broadcast,
        inapp_template,
        inapp_version,
        variant,
        category,
        email_category,
        email_category.template,
        recipient,
        preferences,
        consent,
        device,
        subscription,
        suppression,
        event,
        notification,
        delivery,
        history,
        dead_delivery,
        dead_letter,
        inbox_item,
        digest,
        recurring,
    ]
    secrets = {
        str(tenant.pk),
        tenant.slug,
        tenant.name,
        api_key.name,
        api_key.lookup,
        staff.username,
        *(str(obj.pk) for obj in objects if isinstance(obj.pk, uuid.UUID)),
        inapp_template.key,
        inapp_template.name,
        inapp_version.note,
        variant.title,
        variant.body,
        category.key,
        email_category.key,
        provider.name,
        provider.config["server_token"],
        webhook_endpoint.url,
        webhook_endpoint.description,
        webhook_message.last_error,
        switch.reason,
        recipient_import.source,
        audit_entry.object_id,
        topic.key,
        topic.name,
        segment.key,
        segment.name,
        recipient.external_id,
        recipient.email,
        recipient.phone,
        consent.source,
        device.token,
        subscription.endpoint,
        subscription.p256dh,
        subscription.auth,
        suppression.address,
        suppression.reason,
        event.idempotency_key or "",
        delivery.provider_message_id,
        history.reason,
        dead_letter.reason,
        inbox_item.title,
        inbox_item.body,
        recurring.name,
    }
    return TenantWorld(
        tenant=tenant, api_key=api_key, staff=staff, recipient=recipient, objects=objects, secrets=secrets
    )
