"""The service with its processes on different hosts: the web server in one network
namespace, workers in two others, PostgreSQL, Redis and the provider sandbox on the machine's
side (tests/hosts.py). Each host has its own copy of the code, its own working directory,
temporary directory and metrics directory, so that a file one process writes for another
(under var/, a key, a metrics file) or an address that only works on one machine fails here.

An event accepted by the web host is delivered by the worker hosts on every channel: email,
SMS (whose status callback goes back to the web host), mobile push, web push, and the in-app
inbox, whose live push reaches a WebSocket held by the web host. Beat, on a worker host, has the
gauges computed there, and the web host serves them."""

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import requests
from django.conf import settings
from django.db import connection
from websockets.sync.client import connect

from apps.catalog.models import Category, TemplateVariant, TemplateVersion
from apps.deliveries.models import Delivery, DeliveryStatus
from apps.recipients.models import Device, Recipient, WebPushSubscription
from apps.tenants.demo import demo_workspace_ensure
from notify.sandbox.client import SandboxClient, browser_subscription_keys
from tests.conftest import ROOT
from tests.e2e.test_inbox_e2e import Producer, authenticated, next_message
from tests.factories import CategoryFactory, RecipientFactory, TemplateFactory
from tests.helpers import METRICS_TOKEN, free_port, metric_value, provider_settings, wait_for
from tests.hosts import SUBNET, Network, netns_unavailable

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.worker]

CHANNELS = ["email", "sms", "push", "webpush", "inapp"]
WEB_PORT = 8000
WORKER_METRICS_PORT = 9100


@pytest.fixture
def network(tmp_path: Path) -> Iterator[Network]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    database = connection.settings_dict
    redis_port = urlsplit(settings.CELERY_BROKER_URL).port or 6379
    hosts = Network(
        names=["web", "work-a", "work-b"],
        directory=tmp_path / "hosts",
        forward_ports=(int(database["PORT"] or 5432), redis_port),
    )
    try:
        yield hosts.up()
    finally:
        hosts.down()


@pytest.fixture
def gateway_sandbox(network: Network, tmp_path: Path) -> Iterator[SandboxClient]:
    """The provider sandbox on the machine's side of the subnet, allowed to call the hosts back."""
    url = f"http://{network.gateway}:{free_port()}"
    log = (tmp_path / "sandbox.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "notify.sandbox", "--host", network.gateway, "--port", str(urlsplit(url).port)]
        + ["--callback-network", f"{SUBNET}.0/24"],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    client = SandboxClient(base_url=url)
    try:
        client.wait_until_up()
        yield client
    finally:
        process.terminate()
        process.wait(timeout=10)


def host_environment(*, network: Network, sandbox_url: str, web_url: str) -> dict[str, str]:
    """What every host is told: where PostgreSQL, Redis, the providers and the web host are."""
    database = connection.settings_dict
    return {
        "DATABASE_URL": f"postgres://{database['USER']}@{network.gateway}:{database['PORT']}/{database['NAME']}",
        "CELERY_BROKER_URL": network.reach(settings.CELERY_BROKER_URL),
        "NOTIFY_REDIS_URL": network.reach(settings.NOTIFY_REDIS_URL),
        "NOTIFY_INBOX_LIVE_URL": network.reach(settings.NOTIFY_INBOX_LIVE_URL),
        **provider_settings(sandbox_url=sandbox_url),
        "NOTIFY_PUBLIC_URL": web_url,
        "DJANGO_ALLOWED_HOSTS": urlsplit(web_url).hostname or "",
        "NOTIFY_METRICS_TOKEN": METRICS_TOKEN,
        "NOTIFY_WORKER_METRICS_PORT": str(WORKER_METRICS_PORT),
    }


@pytest.fixture
def everything(workspace) -> Category:  # type: ignore[no-untyped-def]
    """`everything`: one notification on all five channels."""
    template = TemplateFactory(tenant=workspace.tenant, key="everything")
    version = TemplateVersion.objects.create(template=template, number=1)
    for channel in CHANNELS:
        TemplateVariant.objects.create(
            version=version,
            channel=channel,
            subject="Hello from {{ data.where }}",
            title="Hello",
            body="Sent from {{ data.where }}",
            link="/hello",
        )
    return CategoryFactory(tenant=workspace.tenant, key="everything", template=template, default_channels=CHANNELS)


def ada_ensure(*, workspace, sandbox_url: str) -> Recipient:  # type: ignore[no-untyped-def]
    """A recipient with an address, a phone, a phone app and a subscribed browser."""
    recipient = RecipientFactory(tenant=workspace.tenant, external_id="ada", phone="+14155550100")
    Device.objects.create(tenant=workspace.tenant, recipient=recipient, token="token-ada", platform="android")
    WebPushSubscription.objects.create(
        tenant=workspace.tenant,
        recipient=recipient,
        endpoint=f"{sandbox_url}/webpush/sub-ada",
        **browser_subscription_keys(),
    )
    return recipient


def test_an_event_accepted_by_the_web_host_is_delivered_by_worker_hosts_on_every_channel(
    workspace, everything, network, gateway_sandbox, web_server_start, workers
):
    sandbox = gateway_sandbox
    web_url = f"http://{network['web'].address}:{WEB_PORT}"
    environment = host_environment(network=network, sandbox_url=sandbox.base_url, web_url=web_url)
    assert web_server_start(host=network["web"], port=WEB_PORT, env=environment) == web_url
    started = time.time()
    for name, groups in (("work-a", ["normal"]), ("work-b", ["normal", "maintenance"])):
        host = network[name]
        workers.start(*groups, host=host, env={**environment, "NOTIFY_WORKER_METRICS_ADDRESS": host.address})
    workers.start_beat(host=network["work-b"], env={**environment, "NOTIFY_GAUGES_INTERVAL_SECONDS": "2"})
    # Email's "delivered" comes back from the provider to the web host, as SMS' does.
    sandbox.webhooks_set(
        postmark=f"http://sandbox:sandbox-webhook-secret@{network['web'].address}:{WEB_PORT}/anymail/postmark/tracking/"
    )
    ada_ensure(workspace=workspace, sandbox_url=sandbox.base_url)
    producer = Producer(base_url=web_url, api_key=workspace.api_key.raw_key)
    token = producer.post("inbox-tokens", {"recipient": "ada"})["token"]

    with connect(f"ws://{network['web'].address}:{WEB_PORT}/inbox/v1/ws") as socket:
        authenticated(socket, token)
        assert next_message(socket)["type"] == "hello"
        accepted = producer.post("events", {"category": "everything", "recipient": "ada", "data": {"where": "afar"}})
        # Pushed by a worker host, through Redis, to the socket the web host holds.
        item = next_message(socket)
        assert (item["type"], item["item"]["body"]) == ("item", "Sent from afar")

    [notification_id] = accepted["notification_ids"]
    deliveries = Delivery.objects.filter(notification_id=notification_id)

    def statuses() -> dict[str, str]:
        return {d.channel: d.status for d in deliveries.all()}

    wanted = {
        "email": DeliveryStatus.DELIVERED,  # the provider's webhook reached the web host
        "sms": DeliveryStatus.DELIVERED,  # the signed status callback verified on the web host
        "push": DeliveryStatus.SENT,
        "webpush": DeliveryStatus.SENT,
        "inapp": DeliveryStatus.SENT,
    }
    try:
        wait_for(lambda: statuses() == wanted, timeout=30, what="every channel delivered")
    except AssertionError:
        raise AssertionError(f"not every channel delivered: {statuses()}") from None

    log = {entry["provider"]: entry for entry in sandbox.requests_log() if entry["outcome"] == "accepted"}
    assert set(log) == {"postmark", "twilio", "fcm", "webpush"}
    # The links in an email are the web host's, and they work there.
    [unsubscribe] = [
        value.strip("<>") for name, value in log["postmark"]["headers"].items() if name == "List-Unsubscribe"
    ]
    assert unsubscribe.startswith(f"{web_url}/"), unsubscribe
    assert requests.get(unsubscribe, timeout=10).status_code == 200
    # The web push was signed with the key the web host gives browsers to subscribe with.
    demo_workspace_ensure(api_key="ntf_demo_0123456789abcdefTEST")
    page = requests.get(f"{web_url}/demo/webpush/", timeout=10)
    assert log["webpush"]["metadata"]["vapid_key"], log["webpush"]
    assert log["webpush"]["metadata"]["vapid_key"] in page.text

    # Each worker host serves its own counts; together they are every send.
    def sent_counted() -> float:
        total = 0.0
        for name in ("work-a", "work-b"):
            text = requests.get(f"http://{network[name].address}:{WORKER_METRICS_PORT}/metrics", timeout=5).text
            total += metric_value(text, "notify_deliveries_total", state="sent")
        return total

    wait_for(lambda: sent_counted() == len(CHANNELS), timeout=10, what="the worker hosts' metrics to count 5 sends")

    def web_metrics() -> str:
        headers = {"Authorization": f"Bearer {METRICS_TOKEN}"}
        return requests.get(f"{web_url}/metrics", headers=headers, timeout=10).text

    assert metric_value(web_metrics(), "notify_deliveries_total", state="sent") == 0
    # The gauges beat has a worker host compute are kept in Redis, where the web host reads them.
    wait_for(
        lambda: metric_value(web_metrics(), "notify_gauges_computed_timestamp_seconds") > started,
        timeout=20,
        what="the web host to serve the gauges a worker host computed",
    )
    # Each host's metrics stayed in its own directory.
    assert not list((network["web"].directory / "metrics").glob("worker-*"))
    assert all(list((network[name].directory / "metrics").glob("worker-*")) for name in ("work-a", "work-b"))
