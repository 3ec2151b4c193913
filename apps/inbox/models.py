import uuid

from django.db import models

from apps.deliveries.models import Delivery
from apps.recipients.models import Recipient
from apps.tenants.encryption import SealedJSONField, SealedTextField


class InboxItem(models.Model):
    """One in-app notification in a recipient's inbox, with its read, seen and archived state."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    recipient = models.ForeignKey(Recipient, on_delete=models.CASCADE, related_name="inbox_items", db_index=False)
    delivery = models.OneToOneField(Delivery, on_delete=models.CASCADE, related_name="inbox_item")
    # Encrypted for tenants with encrypt_content (apps/tenants/encryption.py); the title is a
    # text column because its ciphertext is longer than the 500 characters it may hold.
    title = SealedTextField(max_length=500, blank=True, default="")
    body = SealedTextField(blank=True, default="")
    link = models.CharField(max_length=2000, blank=True, default="")
    data = SealedJSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    seen_at = models.DateTimeField(null=True, blank=True)
    read_at = models.DateTimeField(null=True, blank=True)
    archived_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [models.Index(fields=["recipient", "-created_at"], name="inbox_recipient_recent")]

    def __str__(self) -> str:
        return self.title or str(self.id)
