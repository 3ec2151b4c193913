from cryptography.hazmat.primitives import serialization
from django.core.management.base import BaseCommand
from py_vapid import Vapid
from py_vapid.utils import b64urlencode


class Command(BaseCommand):
    help = "Make a VAPID key pair for web push: the private key for settings, the public one for browsers."

    def handle(self, *args, **options):  # type: ignore[no-untyped-def]
        vapid = Vapid()
        vapid.generate_keys()
        private = vapid.private_key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        public = vapid.public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        self.stdout.write(f"WEBPUSH_VAPID_PRIVATE_KEY={b64urlencode(private)}")
        self.stdout.write(f"# applicationServerKey for PushManager.subscribe(): {b64urlencode(public)}")
