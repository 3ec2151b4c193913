"""A/B variants side by side: for one template version on one channel, each variant's sends,
deliveries, opens and clicks from the hourly rollups, and a two-proportion z-test of its open
or click rate against the control's (the first variant by key), so that an operator can tell a
real difference from noise.

Rates are shares of the deliveries sent: every channel reports sends, not every one reports
delivery (push, web push and in-app do not), and a provider may report an open before the
delivery, so `sent` is the sample size that never leaves an open uncounted."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from django.db import connection

from apps.catalog.models import TemplateVariant
from apps.ops.models import DeliveryRollupHour

# What a test may compare.
METRICS = ("opened", "clicked")
COUNTED = ("sent", "delivered", "opened", "clicked")


@dataclass(frozen=True)
class ZTest:
    """A pooled two-proportion z-test of a variant's rate against the control's."""

    difference: float  # the variant's rate minus the control's
    z: float
    p_value: float  # two-sided


def two_proportion_z_test(*, control_hits: int, control_size: int, hits: int, size: int) -> ZTest | None:
    """The pooled two-proportion z-test of hits/size against control_hits/control_size; None
    when either sample is empty or the pooled rate is 0 or 1 (no variance to test against)."""
    if not control_size or not size:
        return None
    pooled = (control_hits + hits) / (control_size + size)
    standard_error = math.sqrt(pooled * (1 - pooled) * (1 / control_size + 1 / size))
    if standard_error == 0:
        return None
    difference = hits / size - control_hits / control_size
    z = difference / standard_error
    # Two-sided: P(|Z| >= |z|) = erfc(|z| / sqrt(2)) for a standard normal Z.
    return ZTest(difference=difference, z=z, p_value=math.erfc(abs(z) / math.sqrt(2)))


def variants_compare(
    *,
    tenant_id: UUID | None,
    template_version_id: int,
    channel: str,
    metric: str,
    since: datetime,
    until: datetime,
) -> list[dict[str, Any]]:
    """Each variant of the version on the channel over [since, until) (whole hours), the
    control first, with its counts, rates and, past the control, its test on `metric`."""
    scope, scope_params = ("AND tenant_id = %s", [tenant_id]) if tenant_id is not None else ("", [])
    # One bounded aggregate over the period's hourly rows of one version and channel.
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT variant, outcome, sum(count) FROM {DeliveryRollupHour._meta.db_table} "
            f"WHERE bucket >= %s AND bucket < %s {scope} AND template_version_id = %s AND channel = %s "
            f"AND outcome IN ({', '.join(['%s'] * len(COUNTED))}) GROUP BY variant, outcome",
            [since, until, *scope_params, template_version_id, channel, *COUNTED],
        )
        counted = cursor.fetchall()
    # Every variant the version holds, sent or not yet. What was sent outside the test (a
    # locale with one variant, a sensitive category's notice) counts under "", listed last.
    keys = set(
        TemplateVariant.objects.filter(version_id=template_version_id, channel=channel).values_list("key", flat=True)
    )
    counts: dict[str, dict[str, int]] = {key: dict.fromkeys(COUNTED, 0) for key in keys}
    for variant, outcome, total in counted:
        counts.setdefault(variant, dict.fromkeys(COUNTED, 0))[outcome] += int(total)
    ordered = sorted(key for key in counts if key) + ([""] if "" in counts else [])
    control_key = ordered[0] if ordered else ""
    results: list[dict[str, Any]] = []
    for key in ordered:
        row = counts[key]
        sent = row["sent"]
        rates = {name: round(row[name] / sent, 4) if sent else None for name in ("delivered", *METRICS)}
        result: dict[str, Any] = {"variant": key, "control": key == control_key, **row, "rates": rates, "test": None}
        if key and key != control_key:
            control = counts[control_key]
            test = two_proportion_z_test(
                control_hits=control[metric], control_size=control["sent"], hits=row[metric], size=sent
            )
            if test is not None:
                result["test"] = {
                    "difference": round(test.difference, 4),
                    "z": round(test.z, 4),
                    "p_value": round(test.p_value, 6),
                }
        results.append(result)
    return results
