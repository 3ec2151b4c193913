from django.core.exceptions import ValidationError
from django.db import models

from apps.tenants.models import Tenant
from notify.policy.rules import validate_channel_switches, validate_frequency_cap


class Channel(models.TextChoices):
    EMAIL = "email", "Email"
    SMS = "sms", "SMS"
    PUSH = "push", "Mobile push"
    WEBPUSH = "webpush", "Web push"
    INAPP = "inapp", "In-app inbox"


class Priority(models.TextChoices):
    CRITICAL = "critical", "Critical"
    NORMAL = "normal", "Normal"
    BULK = "bulk", "Bulk"


class Severity(models.TextChoices):
    HIGH = "high", "High"
    MEDIUM = "medium", "Medium"
    LOW = "low", "Low"


class CategoryKind(models.TextChoices):
    CRITICAL = "critical", "Critical (OTP, fraud, security)"
    TRANSACTIONAL = "transactional", "Transactional"
    MARKETING = "marketing", "Marketing"


def validate_channel_list(value: object) -> None:
    valid = set(Channel.values)
    if not isinstance(value, list) or not value or not all(v in valid for v in value):
        raise ValidationError(f"Give a non-empty list of channels from: {', '.join(sorted(valid))}.")


class Template(models.Model):
    """A named message; its content lives in immutable, numbered versions."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="templates")
    key = models.SlugField(max_length=100)
    name = models.CharField(max_length=200)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["tenant", "key"], name="template_key_unique"),
            # What the categories' (template, tenant) foreign key refers to (see Category).
            models.UniqueConstraint(fields=["id", "tenant"], name="template_id_tenant_unique"),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.key})"

    def clean(self) -> None:
        """A template used by categories stays in their tenant."""
        super().clean()
        if self.pk is not None and self.tenant_id is not None:
            used_elsewhere = self.categories.exclude(tenant_id=self.tenant_id).values_list("key", flat=True)
            if keys := list(used_elsewhere[:5]):
                raise ValidationError(
                    {"tenant": f"Categories of its tenant use this template ({', '.join(keys)}); it cannot move."}
                )

    def current_version(self) -> "TemplateVersion | None":
        return self.versions.order_by("-number").first()


class ImmutableModel(models.Model):
    """Rows that may be created and read but never changed: notifications pin them."""

    class Meta:
        abstract = True

    def save(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        if not self._state.adding:
            raise ValidationError(f"{self._meta.verbose_name} is immutable; create a new version instead.")
        super().save(*args, **kwargs)


class TemplateVersion(ImmutableModel):
    template = models.ForeignKey(Template, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField(editable=False)
    note = models.CharField(max_length=200, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["template", "number"], name="template_version_unique")]

    def __str__(self) -> str:
        return f"{self.template.key} v{self.number}"


class TemplateVariant(ImmutableModel):
    """The content of one version for one channel and one locale ("" is the default). Several
    keyed, weighted variants of one channel and locale are an A/B test: each recipient gets one
    of them, always the same (notify/pipeline/plan.py, variant_assign)."""

    version = models.ForeignKey(TemplateVersion, on_delete=models.CASCADE, related_name="variants")
    channel = models.CharField(max_length=16, choices=Channel.choices)
    locale = models.CharField(max_length=35, blank=True, default="", help_text="Empty for the default.")
    key = models.SlugField(
        max_length=20,
        blank=True,
        default="",
        help_text="A/B test: this variant's name, e.g. 'a' or 'b' (the first by name is the control). "
        "Empty when the channel has one variant.",
    )
    weight = models.PositiveIntegerField(
        default=100, help_text="A/B test: this variant's share of recipients, relative to the others' (0: none)."
    )
    subject = models.CharField(max_length=500, blank=True, default="", help_text="Email subject.")
    title = models.CharField(max_length=500, blank=True, default="", help_text="Push or in-app title.")
    body = models.TextField(blank=True, default="", help_text="Plain text: email text part, SMS, push or in-app body.")
    html = models.TextField(blank=True, default="", help_text="Email HTML part.")
    link = models.CharField(max_length=2000, blank=True, default="", help_text="In-app link.")
    data = models.JSONField(default=dict, blank=True, help_text="Push data payload.")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["version", "channel", "locale", "key"], name="template_variant_unique")
        ]

    def __str__(self) -> str:
        return f"{self.channel}/{self.locale or 'default'}" + (f"/{self.key}" if self.key else "")

    def clean(self) -> None:
        """Refuse content that does not compile, naming the field, before it is saved."""
        from django.template import TemplateSyntaxError

        from notify.pipeline.templating import ENGINE

        errors = {}
        for name in ("subject", "title", "body", "html", "link"):
            try:
                ENGINE.from_string(getattr(self, name))
            except TemplateSyntaxError as error:
                errors[name] = f"Template syntax error: {error}"
        if errors:
            raise ValidationError(errors)


class Routing(models.TextChoices):
    ALL = "all", "Every allowed channel"
    FALLBACK = "fallback", "One channel at a time, in the recipient's order, until one reaches them"


class OverBudget(models.TextChoices):
    HOLD = "hold", "Hold it until the next day's budget"
    FALLBACK = "fallback", "Skip the channel (a fallback chain moves on to the next one)"


class WhenInDoubt(models.TextChoices):
    BY_KIND = "", "Resend if critical, else hold"
    RESEND = "resend", "Resend it (at least once: a person may get it twice)"
    HOLD = "hold", "Hold it for an operator (at most once)"


class OverCap(models.TextChoices):
    SUPPRESS = "suppress", "Suppress it"
    DEFER = "defer", "Defer it until the window has room"


class Category(models.Model):
    """What kind of thing happened; it sets the channels, the priority and the template."""

    tenant = models.ForeignKey(Tenant, on_delete=models.CASCADE, related_name="categories")
    key = models.SlugField(max_length=100)
    description = models.CharField(max_length=500, blank=True, default="")
    kind = models.CharField(max_length=16, choices=CategoryKind.choices, default=CategoryKind.TRANSACTIONAL)
    default_channels = models.JSONField(default=list, validators=[validate_channel_list])
    default_priority = models.CharField(max_length=16, choices=Priority.choices, default=Priority.NORMAL)
    template = models.ForeignKey(Template, on_delete=models.PROTECT, related_name="categories")
    # What recipients get unless they say otherwise; critical categories ignore all of these.
    channel_defaults = models.JSONField(
        default=dict,
        blank=True,
        validators=[validate_channel_switches],
        help_text='Channels off unless a recipient turns them on, e.g. {"email": false}.',
    )
    frequency_cap = models.CharField(
        max_length=50,
        blank=True,
        default="",
        validators=[validate_frequency_cap],
        help_text="Most notifications of this category one recipient gets, e.g. '3 per day'.",
    )
    over_cap = models.CharField(max_length=16, choices=OverCap.choices, default=OverCap.SUPPRESS)
    expire_after = models.DurationField(
        null=True, blank=True, help_text="Give up on a deferred notification not sent within this long of its event."
    )
    routing = models.CharField(max_length=16, choices=Routing.choices, default=Routing.ALL)
    over_budget = models.CharField(
        max_length=16,
        choices=OverBudget.choices,
        default=OverBudget.HOLD,
        help_text="When the tenant's daily SMS budget is spent.",
    )
    when_in_doubt = models.CharField(
        max_length=8,
        choices=WhenInDoubt.choices,
        default=WhenInDoubt.BY_KIND,
        blank=True,
        help_text="When an attempt's fate is unknown and the provider cannot be asked whether it has the "
        "message (mobile push, web push and in-app always resend: a repeat replaces the one shown).",
    )
    fallback_timeout = models.DurationField(
        null=True,
        blank=True,
        help_text="Fallback: move on when a sent step is not confirmed delivered within this long "
        "(email and SMS report delivery; push, web push and in-app count as reached once sent).",
    )
    escalate_after = models.DurationField(
        null=True, blank=True, help_text="Send on the escalation channels too if the in-app item is unread this long."
    )
    escalate_to = models.JSONField(
        default=list, blank=True, validators=[validate_channel_list], help_text='e.g. ["email"]'
    )
    severity = models.CharField(
        max_length=8,
        choices=Severity.choices,
        default=Severity.MEDIUM,
        help_text="How its in-app items rank; the bell's badge shows the highest unread. An event may override it.",
    )
    # A digest category collects each recipient's events and sends them as one notification.
    digest_window = models.DurationField(
        null=True,
        blank=True,
        help_text="Collect events for this long after a recipient's first one, then send them as one digest.",
    )
    digest_max = models.PositiveIntegerField(
        null=True, blank=True, help_text="Send the digest as soon as it holds this many events."
    )
    # HIPAA-style: the content goes only to the authenticated in-app inbox (notify/pipeline/send.py).
    sensitive = models.BooleanField(
        default=False,
        help_text="Email, SMS, push and web push get only a notice and a link; the content goes to the in-app inbox.",
    )
    secure_message_text = models.CharField(
        max_length=300, blank=True, default="", help_text="The notice; empty: the tenant's, else the installation's."
    )
    # Chat-like events: each recipient gets them on each channel in the order they were accepted
    # (notify/pipeline/ordering.py).
    ordered = models.BooleanField(
        default=False,
        help_text="Send each recipient's notifications of this category, on each channel, in the order their "
        "events were accepted: one waiting for a retry holds back that recipient's later ones.",
    )

    class Meta:
        verbose_name_plural = "categories"
        constraints = [models.UniqueConstraint(fields=["tenant", "key"], name="category_key_unique")]

    def __str__(self) -> str:
        return self.key

    def clean(self) -> None:
        """A category can only use its own tenant's templates."""
        super().clean()
        if error := self._template_tenant_error():
            raise ValidationError({"template": error})

    def save(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        # Also refused where no form validates (code, the shell). On PostgreSQL a foreign key
        # on (template, tenant) enforces the same in the database (catalog migration 0010).
        if error := self._template_tenant_error():
            raise ValidationError({"template": error})
        super().save(*args, **kwargs)

    def _template_tenant_error(self) -> str:
        if self.template_id is None or self.tenant_id is None or self.template.tenant_id == self.tenant_id:
            return ""
        return (
            f"Template '{self.template.key}' belongs to another tenant; choose one of this tenant's templates "
            "(or create the template in this tenant first)."
        )
