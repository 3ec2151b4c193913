"""The demo workspace: created idempotently by `manage.py demo_setup` and by tests."""

from django.contrib.auth import get_user_model
from django.db import transaction

from apps.audiences.models import Topic, TopicMembership
from apps.catalog.models import Category, CategoryKind, Priority, Template, TemplateVariant, TemplateVersion
from apps.recipients.models import Device, Recipient, WebPushSubscription
from apps.tenants.models import ALL_SCOPES, ApiKey, Tenant
from notify.sandbox.client import browser_subscription_keys

WELCOME_VARIANTS = [
    {
        "channel": "email",
        "locale": "",
        "subject": "Welcome, {{ data.name|default:recipient.id }}!",
        "body": "Hi {{ data.name|default:recipient.id }}, your account is ready.",
        "html": "<p>Hi <b>{{ data.name|default:recipient.id }}</b>, your account is ready.</p>",
    },
    {
        "channel": "email",
        "locale": "es",
        "subject": "¡Bienvenido, {{ data.name|default:recipient.id }}!",
        "body": "Hola {{ data.name|default:recipient.id }}, tu cuenta está lista.",
        "html": "<p>Hola <b>{{ data.name|default:recipient.id }}</b>, tu cuenta está lista.</p>",
    },
]
OTP_VARIANTS = [
    {
        "channel": "sms",
        "locale": "",
        "body": "Your sign-in code is {{ data.code }}. It expires in 10 minutes.",
    },
    {
        "channel": "email",
        "locale": "",
        "subject": "Your sign-in code: {{ data.code }}",
        "body": "Your code is {{ data.code }}. It expires in 10 minutes.",
    },
]
ALERT_VARIANTS = [
    {
        "channel": "push",
        "locale": "",
        "title": "{{ data.title|default:'Heads up' }}",
        "body": "{{ data.text }}",
        "data": {"screen": "alerts"},
    },
]
BROWSER_ALERT_VARIANTS = [
    {"channel": "webpush", "locale": "", "title": "Notify demo", "body": "{{ data.text }}", "link": "/demo/webpush/"},
]
MENTION_VARIANTS = [
    {
        "channel": "inapp",
        "locale": "",
        "title": "{{ data.who|default:'Someone' }} mentioned you",
        "body": "{{ data.text }}",
        "link": "/demo/inbox/",
    },
]
# An A/B test of two subject lines, half the recipients each (README, "A/B tests").
DIGEST_VARIANTS = [
    {
        "channel": "email",
        "locale": "",
        "key": key,
        "weight": 50,
        "subject": subject,
        "body": "{{ data.headline }}",
        "html": "<h1>{{ data.headline }}</h1>",
    }
    for key, subject in (("a", "This week: {{ data.headline }}"), ("b", "{{ data.headline }}, and more this week"))
]

ANNOUNCEMENT_VARIANTS = [
    {
        "channel": "email",
        "locale": "",
        "subject": "{{ data.headline }}",
        "body": "{{ data.headline }}",
        "html": "<p>{{ data.headline }}</p>",
    }
]
# The demo topic's subscribers: the demo recipient and this many readers.
DEMO_READERS = 50


@transaction.atomic
def demo_workspace_ensure(
    *, api_key: str, admin_username: str = "", admin_password: str = "", webpush_endpoint: str = ""
) -> Tenant:
    """Create the demo tenant, its categories, templates, a recipient with a device, the demo
    API key and an admin login, each only if missing; with `webpush_endpoint` (the sandbox's
    push service), a browser subscription for the recipient too."""
    tenant, _ = Tenant.objects.get_or_create(slug="demo", defaults={"name": "Demo workspace"})
    for key, description, kind, priority, channels, variants in (
        ("welcome", "Account emails", CategoryKind.TRANSACTIONAL, Priority.NORMAL, ["email"], WELCOME_VARIANTS),
        ("otp", "Sign-in codes", CategoryKind.CRITICAL, Priority.CRITICAL, ["sms"], OTP_VARIANTS),
        ("weekly-digest", "News and offers", CategoryKind.MARKETING, Priority.BULK, ["email"], DIGEST_VARIANTS),
        ("alert", "Alerts on your phone", CategoryKind.TRANSACTIONAL, Priority.NORMAL, ["push"], ALERT_VARIANTS),
        (
            "browser-alert",
            "Alerts in your browser",
            CategoryKind.TRANSACTIONAL,
            Priority.NORMAL,
            ["webpush"],
            BROWSER_ALERT_VARIANTS,
        ),
        ("mention", "Mentions", CategoryKind.TRANSACTIONAL, Priority.NORMAL, ["inapp"], MENTION_VARIANTS),
        (
            "announcement",
            "Product announcements",
            CategoryKind.TRANSACTIONAL,
            Priority.BULK,
            ["email"],
            ANNOUNCEMENT_VARIANTS,
        ),
    ):
        template, created = Template.objects.get_or_create(tenant=tenant, key=key, defaults={"name": key})
        if created:
            version = TemplateVersion.objects.create(template=template, number=1, note="demo")
            for variant in variants:
                TemplateVariant.objects.create(version=version, **variant)
        Category.objects.get_or_create(
            tenant=tenant,
            key=key,
            defaults={
                "kind": kind,
                "default_priority": priority,
                "default_channels": channels,
                "template": template,
                "description": description,
            },
        )
    ada, _ = Recipient.objects.get_or_create(
        tenant=tenant,
        external_id="ada",
        defaults={"email": "ada@example.com", "locale": "en", "timezone": "Europe/London"},
    )
    Device.objects.get_or_create(
        tenant=tenant, token="demo-device-token", defaults={"recipient": ada, "platform": "android", "app": "demo"}
    )
    _demo_topic_ensure(tenant=tenant, ada=ada)
    if webpush_endpoint:
        WebPushSubscription.objects.get_or_create(
            tenant=tenant, endpoint=webpush_endpoint, defaults={"recipient": ada, **browser_subscription_keys()}
        )
    if api_key:
        # The demo shows everything the API does, recurring sends included.
        demo_key = ApiKey(tenant=tenant, name="demo", scopes=list(ALL_SCOPES))
        demo_key.assign_secret(raw_key=api_key)
        if not ApiKey.objects.filter(lookup=demo_key.lookup).exists():
            demo_key.save()
    if admin_username:
        User = get_user_model()
        if not User.objects.filter(username=admin_username).exists():
            User.objects.create_superuser(admin_username, f"{admin_username}@example.com", admin_password)
    return tenant


def _demo_topic_ensure(*, tenant: Tenant, ada: Recipient) -> None:
    """`product-news`: a topic the demo broadcasts to, with the demo recipient and readers."""
    topic, created = Topic.objects.get_or_create(
        tenant=tenant, key="product-news", defaults={"name": "Product news", "description": "Demo broadcast topic"}
    )
    if not created:
        return
    readers = [
        Recipient.objects.get_or_create(
            tenant=tenant, external_id=f"reader-{i}", defaults={"email": f"reader-{i}@example.com"}
        )[0]
        for i in range(DEMO_READERS)
    ]
    TopicMembership.objects.bulk_create(
        [TopicMembership(topic=topic, recipient=r) for r in [ada, *readers]], ignore_conflicts=True
    )
