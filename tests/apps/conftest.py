import pytest

from apps.catalog.models import TemplateVariant, TemplateVersion
from tests.factories import CategoryFactory, TemplateFactory


@pytest.fixture
def inbox_category(workspace):  # type: ignore[no-untyped-def]
    template = TemplateFactory(tenant=workspace.tenant, key="mention")
    version = TemplateVersion.objects.create(template=template, number=1)
    TemplateVariant.objects.create(
        version=version, channel="inapp", title="{{ data.who }} mentioned you", body="{{ data.text }}", link="/c/1"
    )
    return CategoryFactory(tenant=workspace.tenant, key="mention", template=template, default_channels=["inapp"])
