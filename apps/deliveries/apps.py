from django.apps import AppConfig


class DeliveriesConfig(AppConfig):
    name = "apps.deliveries"
    label = "deliveries"

    def ready(self) -> None:
        # Connects the email channel's provider-feedback receiver.
        import notify.channels.email  # noqa: F401
        import notify.pipeline.bulk  # noqa: F401 - registers the any_of lookup
        from apps.deliveries import checks  # noqa: F401 - registers the configuration checks
