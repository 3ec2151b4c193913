"""Publishing template versions: a new number for each, and promoting an A/B test's winner."""

from django.db import transaction
from django.db.models import Max

from apps.catalog.models import Template, TemplateVariant, TemplateVersion


class PromoteError(Exception):
    """The variant cannot be promoted; `field` names the input at fault."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def template_version_number_next(*, template_id: int) -> int:
    """The number the template's next version takes. Call it in a transaction: it locks the
    template, so that two publishers take two numbers."""
    Template.objects.select_for_update().filter(pk=template_id).first()
    latest = TemplateVersion.objects.filter(template_id=template_id).aggregate(n=Max("number"))["n"]
    return (latest or 0) + 1


@transaction.atomic
def template_variant_promote(*, version: TemplateVersion, channel: str, key: str) -> TemplateVersion:
    """Publish a new version of the template whose content on `channel` is only the winning
    variant's, in every locale that has it (locales without it keep their own content); the
    other channels' content is copied as it is. The old version stays as it was, and its
    notifications with it. Categories send the newest version of their template, so new
    notifications use the winner at once."""
    if not key:
        raise PromoteError(field="variant", message="Name the variant to promote.")
    variants = list(version.variants.order_by("channel", "locale", "key"))
    on_channel = [v for v in variants if v.channel == channel]
    if not on_channel:
        raise PromoteError(field="channel", message=f"{version} has no content for {channel}.")
    if not any(v.key == key for v in on_channel):
        keys = ", ".join(sorted({v.key for v in on_channel if v.key})) or "none"
        raise PromoteError(field="variant", message=f"{version} has no {channel} variant '{key}' (it has: {keys}).")
    winning_locales = {v.locale for v in on_channel if v.key == key}
    promoted = TemplateVersion.objects.create(
        template_id=version.template_id,
        number=template_version_number_next(template_id=version.template_id),
        note=f"Variant '{key}' of v{version.number} promoted on {channel}"[:200],
    )
    for variant in variants:
        winner = variant.channel == channel and variant.key == key
        if variant.channel == channel and variant.locale in winning_locales and not winner:
            continue
        content = {
            name: getattr(variant, name) for name in ("channel", "locale", "subject", "title", "body", "html", "link")
        }
        # The winner is the channel's only content now: no test left, so no key to note.
        TemplateVariant.objects.create(
            version=promoted,
            data=variant.data,
            key="" if winner else variant.key,
            weight=100 if winner else variant.weight,
            **content,
        )
    return promoted
