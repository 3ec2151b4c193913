from django.apps import AppConfig


class RecipientsConfig(AppConfig):
    name = "apps.recipients"
    label = "recipients"

    def ready(self) -> None:
        from notify.policy import preferences  # noqa: F401 - connects the cache's invalidation to model saves
