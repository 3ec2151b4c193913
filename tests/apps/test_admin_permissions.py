"""Each admin action takes its own permission: a staff user who may only view cannot run it,
neither from the page (it is not offered) nor by a forged POST."""

from collections.abc import Callable
from dataclasses import dataclass

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from apps.deliveries.models import ChannelSwitch, DeadLetter, Delivery, DeliveryStatus, Notification, Provider
from apps.tenants.models import ApiKey
from apps.webhooks.models import WebhookEndpoint, WebhookMessage
from notify.resilience.providers import breaker_for, breaker_state
from tests.factories import StaffUserFactory, TenantWorld, tenant_world


@dataclass
class ActionCase:
    changelist: str  # admin URL name
    action: str
    view_permission: str
    action_permission: str
    target: Callable[[TenantWorld], object]  # makes the row to act on
    done: Callable[[object], bool]  # whether the action took effect


def queued_notification(world: TenantWorld) -> Notification:
    [notification] = world.of_model(Notification)
    Delivery.objects.create(
        notification=notification, channel="sms", priority="normal", status="queued", next_attempt_at=timezone.now()
    )
    return notification


def open_circuit(world: TenantWorld) -> Provider:
    provider = Provider.objects.create(tenant=world.tenant, name="postmark-main", channel="email")
    breaker_for(provider).open()
    return provider


CASES = {
    "pause a channel": ActionCase(
        "admin:deliveries_channelswitch_changelist",
        "pause",
        "deliveries.view_channelswitch",
        "deliveries.pause_channelswitch",
        lambda world: ChannelSwitch.objects.create(tenant=world.tenant, channel="email"),
        lambda switch: ChannelSwitch.objects.get(pk=switch.pk).paused,  # type: ignore[attr-defined]
    ),
    "resume a channel": ActionCase(
        "admin:deliveries_channelswitch_changelist",
        "resume",
        "deliveries.view_channelswitch",
        "deliveries.pause_channelswitch",
        lambda world: ChannelSwitch.objects.create(tenant=world.tenant, channel="email", paused=True),
        lambda switch: not ChannelSwitch.objects.get(pk=switch.pk).paused,  # type: ignore[attr-defined]
    ),
    "pause a provider": ActionCase(
        "admin:deliveries_provider_changelist",
        "pause",
        "deliveries.view_provider",
        "deliveries.pause_provider",
        lambda world: Provider.objects.create(tenant=world.tenant, name="postmark-main", channel="email"),
        lambda provider: not Provider.objects.get(pk=provider.pk).enabled,  # type: ignore[attr-defined]
    ),
    "resume a provider": ActionCase(
        "admin:deliveries_provider_changelist",
        "resume",
        "deliveries.view_provider",
        "deliveries.pause_provider",
        lambda world: Provider.objects.create(
            tenant=world.tenant, name="postmark-main", channel="email", enabled=False
        ),
        lambda provider: Provider.objects.get(pk=provider.pk).enabled,  # type: ignore[attr-defined]
    ),
    "reset a circuit": ActionCase(
        "admin:deliveries_provider_changelist",
        "reset_circuit",
        "deliveries.view_provider",
        "deliveries.reset_circuit_provider",
        open_circuit,
        lambda provider: breaker_state(provider) == "closed",  # type: ignore[arg-type]
    ),
    "cancel a notification": ActionCase(
        "admin:deliveries_notification_changelist",
        "cancel",
        "deliveries.view_notification",
        "deliveries.cancel_notification",
        queued_notification,
        lambda notification: Delivery.objects.filter(
            notification=notification, channel="sms", status=DeliveryStatus.CANCELLED
        ).exists(),
    ),
    "replay a dead letter": ActionCase(
        "admin:deliveries_deadletter_changelist",
        "replay",
        "deliveries.view_deadletter",
        "deliveries.replay_deadletter",
        lambda world: world.of_model(DeadLetter)[0],
        lambda dead_letter: DeadLetter.objects.get(pk=dead_letter.pk).replayed_at is not None,  # type: ignore[attr-defined]
    ),
    "replay a webhook message": ActionCase(
        "admin:webhooks_webhookmessage_changelist",
        "replay",
        "webhooks.view_webhookmessage",
        "webhooks.replay_webhookmessage",
        lambda world: world.of_model(WebhookMessage)[0],
        lambda message: WebhookMessage.objects.get(pk=message.pk).last_error == "",  # type: ignore[attr-defined]
    ),
    "disable a webhook endpoint": ActionCase(
        "admin:webhooks_webhookendpoint_changelist",
        "disable",
        "webhooks.view_webhookendpoint",
        "webhooks.change_webhookendpoint",
        lambda world: world.of_model(WebhookEndpoint)[0],
        lambda endpoint: not WebhookEndpoint.objects.get(pk=endpoint.pk).enabled,  # type: ignore[attr-defined]
    ),
    "rotate an API key": ActionCase(
        "admin:tenants_apikey_changelist",
        "rotate",
        "tenants.view_apikey",
        "tenants.rotate_apikey",
        lambda world: world.api_key,
        lambda key: ApiKey.objects.get(pk=key.pk).previous_digest != "",  # type: ignore[attr-defined]
    ),
    "revoke an API key": ActionCase(
        "admin:tenants_apikey_changelist",
        "revoke",
        "tenants.view_apikey",
        "tenants.revoke_apikey",
        lambda world: world.api_key,
        lambda key: ApiKey.objects.get(pk=key.pk).revoked_at is not None,  # type: ignore[attr-defined]
    ),
}


def logged_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def offered_actions(client: Client, changelist: str) -> set[str]:
    page = client.get(reverse(changelist))
    assert page.status_code == 200
    form = page.context["action_form"]  # None when no action is offered
    return {name for name, _ in form.fields["action"].choices} if form else set()


def run_action(client: Client, case: ActionCase, target: object) -> None:
    client.post(reverse(case.changelist), {"action": case.action, "_selected_action": [target.pk]})  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", CASES)
def test_a_staff_user_who_may_only_view_cannot_run_the_action(name, db, broker):
    case = CASES[name]
    world = tenant_world(tag="alpha")
    staff = StaffUserFactory(tenant=world.tenant, permissions=[case.view_permission])
    target = case.target(world)
    client = logged_in(staff)
    assert case.action not in offered_actions(client, case.changelist)
    run_action(client, case, target)
    assert not case.done(target)


@pytest.mark.parametrize("name", CASES)
def test_a_staff_user_with_the_action_permission_runs_it(name, db, broker):
    case = CASES[name]
    world = tenant_world(tag="alpha")
    staff = StaffUserFactory(tenant=world.tenant, permissions=[case.view_permission, case.action_permission])
    target = case.target(world)
    client = logged_in(staff)
    assert case.action in offered_actions(client, case.changelist)
    run_action(client, case, target)
    assert case.done(target)


def test_an_action_runs_only_on_the_staff_users_own_tenants_rows(db, broker):
    alpha, bravo = tenant_world(tag="alpha"), tenant_world(tag="bravo")
    staff = StaffUserFactory(
        tenant=alpha.tenant, permissions=["deliveries.view_notification", "deliveries.cancel_notification"]
    )
    theirs = queued_notification(bravo)
    run_action(logged_in(staff), CASES["cancel a notification"], theirs)
    assert Delivery.objects.get(notification=theirs, channel="sms").status == DeliveryStatus.QUEUED


def test_a_tenants_staff_cannot_switch_the_installations_channels_or_providers(db, broker):
    alpha = tenant_world(tag="alpha")
    staff = StaffUserFactory(
        tenant=alpha.tenant,
        permissions=[
            "deliveries.view_channelswitch",
            "deliveries.pause_channelswitch",
            "deliveries.view_provider",
            "deliveries.pause_provider",
        ],
    )
    switch = ChannelSwitch.objects.create(channel="email")  # the installation's
    provider = Provider.objects.create(name="postmark-main", channel="email")
    client = logged_in(staff)
    run_action(client, CASES["pause a channel"], switch)
    run_action(client, CASES["pause a provider"], provider)
    assert not ChannelSwitch.objects.get(pk=switch.pk).paused
    assert Provider.objects.get(pk=provider.pk).enabled


def test_switching_a_channel_on_its_page_takes_the_pause_permission(db, broker):
    tenant = tenant_world(tag="alpha").tenant
    switch = ChannelSwitch.objects.create(tenant=tenant, channel="email")
    url = reverse("admin:deliveries_channelswitch_change", args=[switch.pk])
    editor = StaffUserFactory(
        tenant=tenant, permissions=["deliveries.view_channelswitch", "deliveries.change_channelswitch"]
    )
    assert logged_in(editor).post(url, {"paused": "on", "reason": "x"}).status_code == 403
    assert not ChannelSwitch.objects.get(pk=switch.pk).paused

    pauser = StaffUserFactory(
        tenant=tenant,
        permissions=[
            "deliveries.view_channelswitch",
            "deliveries.change_channelswitch",
            "deliveries.pause_channelswitch",
        ],
    )
    assert logged_in(pauser).post(url, {"paused": "on", "reason": "x"}).status_code == 302
    assert ChannelSwitch.objects.get(pk=switch.pk).paused


def test_a_provider_is_enabled_or_disabled_on_its_page_only_with_the_pause_permission(db, broker):
    tenant = tenant_world(tag="alpha").tenant
    provider = Provider.objects.create(tenant=tenant, name="postmark-main", channel="email")
    url = reverse("admin:deliveries_provider_change", args=[provider.pk])
    form = {
        "name": "postmark-main",
        "channel": "email",
        "position": 0,
        "weight": 1,
        "config": "{}",
        "failure_threshold": 5,
        "cooldown_seconds": 30,
    }  # "enabled" left out: unticked
    editor = StaffUserFactory(tenant=tenant, permissions=["deliveries.view_provider", "deliveries.change_provider"])
    assert logged_in(editor).post(url, form).status_code == 302
    assert Provider.objects.get(pk=provider.pk).enabled
    pauser = StaffUserFactory(
        tenant=tenant,
        permissions=["deliveries.view_provider", "deliveries.change_provider", "deliveries.pause_provider"],
    )
    assert logged_in(pauser).post(url, form).status_code == 302
    assert not Provider.objects.get(pk=provider.pk).enabled
