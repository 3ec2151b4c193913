"""Audiences: a segment's filter or a broadcast's audience, compiled into one WHERE clause over
the tenant's recipients, so that counting and fan-out happen in the database.

A filter is a clause, or {"all": [clauses]}, {"any": [clauses]} or {"not": clause}. A clause
matches a field: {"field": "locale", "prefix": "es"}, with one operator among eq, in,
exists, prefix, gt, gte, lt and lte; or topic membership: {"topic": "breaking-news"}. Fields
are the recipient's columns (FIELDS) and `attributes.some.path`."""

from datetime import UTC, date, datetime, time
from typing import Any

from django.db.models import Exists, F, Func, OuterRef, Q, QuerySet, TextField, Value
from django.db.models.fields.json import KT
from django.db.models.functions import Collate
from django.db.models.lookups import Exact, GreaterThan, GreaterThanOrEqual, LessThan, LessThanOrEqual
from django.utils.dateparse import parse_datetime

from apps.audiences.models import Segment, Topic, TopicMembership
from apps.recipients.models import Recipient
from apps.tenants.models import Tenant

FIELDS = ("external_id", "email", "phone", "locale", "timezone", "created_at")
OPERATORS = ("eq", "in", "exists", "prefix", "gt", "gte", "lt", "lte")
COMPARISONS = ("gt", "gte", "lt", "lte")
COMBINATORS = ("all", "any", "not")
MAX_CLAUSES = 100
MAX_IN_VALUES = 1000


class AudienceError(Exception):
    """A filter or audience the engine refuses; `field` is the dotted path of the bad clause."""

    def __init__(self, *, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class _JsonbTypeof(Func):
    function = "jsonb_typeof"
    output_field = TextField()


def segment_filter_compile(*, tenant: Tenant, filter: Any, field: str = "filter") -> Q:
    """The filter as a Q over Recipient; raises AudienceError naming the first bad clause."""
    return _Compiler(tenant=tenant).clause(filter, path=field)


class _Compiler:
    def __init__(self, *, tenant: Tenant) -> None:
        self.tenant = tenant
        self.clauses = 0

    def clause(self, node: Any, *, path: str) -> Q:
        self.clauses += 1
        if self.clauses > MAX_CLAUSES:
            raise AudienceError(field=path, message=f"A filter has at most {MAX_CLAUSES} clauses.")
        if not isinstance(node, dict) or not node:
            raise AudienceError(
                field=path, message='Give a clause object, such as {"field": "locale", "eq": "en"} or {"all": [...]}.'
            )
        combinators = [key for key in COMBINATORS if key in node]
        if combinators:
            if len(node) != 1:
                raise AudienceError(field=path, message=f"'{combinators[0]}' stands alone in its clause object.")
            return self._combined(combinators[0], node[combinators[0]], path=path)
        if "topic" in node:
            if len(node) != 1:
                raise AudienceError(field=path, message="A topic clause has only 'topic'.")
            return self._topic(node["topic"], path=f"{path}.topic")
        if "field" not in node:
            raise AudienceError(
                field=path,
                message=f"Unknown clause: give 'field' and an operator, 'topic', or one of {', '.join(COMBINATORS)}.",
            )
        return self._field(node, path=path)

    def _combined(self, combinator: str, value: Any, *, path: str) -> Q:
        if combinator == "not":
            return ~self.clause(value, path=f"{path}.not")
        if not isinstance(value, list) or not value:
            raise AudienceError(field=f"{path}.{combinator}", message="Give a non-empty list of clauses.")
        compiled = [self.clause(item, path=f"{path}.{combinator}[{i}]") for i, item in enumerate(value)]
        combined = compiled[0]
        for q in compiled[1:]:
            combined = combined & q if combinator == "all" else combined | q
        return combined

    def _topic(self, key: Any, *, path: str) -> Q:
        if not isinstance(key, str):
            raise AudienceError(field=path, message="Give a topic key.")
        topic_id = Topic.objects.filter(tenant=self.tenant, key=key).values_list("id", flat=True).first()
        if topic_id is None:
            raise AudienceError(field=path, message=f"Unknown topic '{key}'.")
        return Q(Exists(TopicMembership.objects.filter(topic_id=topic_id, recipient_id=OuterRef("pk"))))

    def _field(self, node: dict[str, Any], *, path: str) -> Q:
        name = node["field"]
        is_attribute = isinstance(name, str) and name.startswith("attributes.") and len(name) > len("attributes.")
        if not isinstance(name, str) or not (name in FIELDS or is_attribute):
            raise AudienceError(
                field=f"{path}.field",
                message=f"Unknown field '{name}'. Use one of {', '.join(FIELDS)}, or attributes.<key>.",
            )
        operators = [key for key in node if key != "field"]
        if len(operators) != 1 or operators[0] not in OPERATORS:
            unknown = next((key for key in operators if key not in OPERATORS), None)
            message = (
                f"Unknown operator '{unknown}'. Use one of {', '.join(OPERATORS)}."
                if unknown
                else f"Give exactly one operator among {', '.join(OPERATORS)}."
            )
            raise AudienceError(field=f"{path}.{unknown}" if unknown else path, message=message)
        operator = operators[0]
        value = node[operator]
        where = f"{path}.{operator}"
        if is_attribute:
            return self._attribute(name.removeprefix("attributes.").split("."), operator, value, path=where)
        return self._column(name, operator, value, path=where)

    def _column(self, name: str, operator: str, value: Any, *, path: str) -> Q:
        if operator == "exists":
            _boolean(value, path=path)
            # Text columns are never null: an empty one is a missing value.
            return ~Q(**{name: ""}) if value else Q(**{name: ""})
        if name == "created_at":
            if operator not in COMPARISONS:
                raise AudienceError(field=path, message="created_at takes gt, gte, lt or lte with a date.")
            moment = _moment(value, path=path)
            return Q(**{f"created_at__{operator}": moment})
        if operator in COMPARISONS:
            raise AudienceError(field=path, message=f"'{name}' is text: compare created_at or an attribute instead.")
        if operator == "in":
            return Q(**{f"{name}__in": _strings(value, path=path)})
        text = _string(value, path=path)
        if operator == "prefix":
            if name == "locale":  # a language tag's prefix: "es" is es, es-MX and es-419, not "est"
                return Q(locale__iexact=text) | Q(locale__istartswith=f"{text}-")
            return Q(**{f"{name}__startswith": text})
        return Q(**{name: text})

    def _attribute(self, keys: list[str], operator: str, value: Any, *, path: str) -> Q:
        if any(not key for key in keys):
            raise AudienceError(field=path, message="An attribute path has no empty parts.")
        lookup = "attributes__" + "__".join(keys)
        if operator == "eq":
            _scalar(value, path=path)
            # Containment (@>), which an index on attributes can answer.
            return Q(attributes__contains=_nested(keys, value))
        if operator == "in":
            values = _scalars(value, path=path)
            combined = Q(attributes__contains=_nested(keys, values[0]))
            for item in values[1:]:
                combined |= Q(attributes__contains=_nested(keys, item))
            return combined
        if operator == "exists":
            _boolean(value, path=path)
            present = Q(**{f"{lookup}__isnull": False})
            return present if value else ~present
        if operator == "prefix":
            return _typed(lookup, "string") & Q(**{f"{lookup}__startswith": _string(value, path=path)})
        # A comparison: numbers as numbers; dates (ISO 8601 strings) in byte order, so that a
        # collation never reorders them.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise AudienceError(field=path, message="Compare with a number or an ISO 8601 date.")
        if isinstance(value, str):
            _moment(value, path=path)
            text = Collate(KT(lookup), "C")
            return _typed(lookup, "string") & _compare(text, operator, value)
        return _typed(lookup, "number") & Q(**{f"{lookup}__{operator}": value})


def _typed(lookup: str, json_type: str) -> Q:
    """The attribute holds a JSON value of that type: a comparison never mixes types."""
    return Q(Exact(_JsonbTypeof(F(lookup)), Value(json_type)))


def _compare(expression: Any, operator: str, value: str) -> Q:
    lookups = {"gt": GreaterThan, "gte": GreaterThanOrEqual, "lt": LessThan, "lte": LessThanOrEqual}
    return Q(lookups[operator](expression, Value(value)))


def _nested(keys: list[str], value: Any) -> dict[str, Any]:
    nested: Any = value
    for key in reversed(keys):
        nested = {key: nested}
    return nested


def _boolean(value: Any, *, path: str) -> bool:
    if not isinstance(value, bool):
        raise AudienceError(field=path, message="Give true or false.")
    return value


def _string(value: Any, *, path: str) -> str:
    if not isinstance(value, str):
        raise AudienceError(field=path, message="Give a string.")
    return value


def _strings(value: Any, *, path: str) -> list[str]:
    if not isinstance(value, list) or not value or len(value) > MAX_IN_VALUES:
        raise AudienceError(field=path, message=f"Give a list of 1 to {MAX_IN_VALUES} strings.")
    for index, item in enumerate(value):
        _string(item, path=f"{path}[{index}]")
    return value


def _scalar(value: Any, *, path: str) -> Any:
    if not isinstance(value, (str, int, float, bool)):
        raise AudienceError(field=path, message="Give a string, a number or a boolean.")
    return value


def _scalars(value: Any, *, path: str) -> list[Any]:
    if not isinstance(value, list) or not value or len(value) > MAX_IN_VALUES:
        raise AudienceError(field=path, message=f"Give a list of 1 to {MAX_IN_VALUES} values.")
    for index, item in enumerate(value):
        _scalar(item, path=f"{path}[{index}]")
    return value


def _moment(value: Any, *, path: str) -> datetime:
    """An ISO 8601 date or time; without an offset, UTC."""
    if isinstance(value, str):
        try:
            moment = parse_datetime(value) or datetime.combine(date.fromisoformat(value), time())
        except ValueError:
            moment = None
        if moment is not None:
            return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    raise AudienceError(field=path, message="Give an ISO 8601 date, such as 2026-01-31 or 2026-01-31T09:00:00Z.")


def audience_recipients(*, tenant: Tenant, audience: dict[str, Any]) -> QuerySet[Recipient]:
    """The tenant's recipients in a broadcast's audience (checked by audience_validate)."""
    return Recipient.objects.filter(tenant=tenant).filter(audience_compile(tenant=tenant, audience=audience))


def audience_compile(*, tenant: Tenant, audience: Any, field: str = "audience") -> Q:
    """{"topic": key}, {"topics": [keys]}, {"segment": key} or {"all": true}, each with an
    optional "exclude" audience, as a Q over Recipient; raises AudienceError."""
    if not isinstance(audience, dict):
        raise AudienceError(field=field, message='Give {"topic": key}, {"segment": key} or {"all": true}.')
    kinds = [key for key in ("topic", "topics", "segment", "all") if key in audience]
    unknown = [key for key in audience if key not in ("topic", "topics", "segment", "all", "exclude")]
    if unknown:
        raise AudienceError(field=f"{field}.{unknown[0]}", message=f"Unknown audience key '{unknown[0]}'.")
    if len(kinds) != 1:
        raise AudienceError(field=field, message="Give exactly one of 'topic', 'topics', 'segment' or 'all'.")
    kind = kinds[0]
    value = audience[kind]
    compiler = _Compiler(tenant=tenant)
    if kind == "all":
        if value is not True:
            raise AudienceError(field=f"{field}.all", message="'all' takes true.")
        included = Q()
    elif kind == "topic":
        included = compiler._topic(value, path=f"{field}.topic")
    elif kind == "topics":
        if not isinstance(value, list) or not value or len(value) > MAX_CLAUSES:
            raise AudienceError(field=f"{field}.topics", message=f"Give a list of 1 to {MAX_CLAUSES} topic keys.")
        topic_ids = []
        for index, key in enumerate(value):
            if not isinstance(key, str):
                raise AudienceError(field=f"{field}.topics[{index}]", message="Give a topic key.")
            topic_id = Topic.objects.filter(tenant=tenant, key=key).values_list("id", flat=True).first()
            if topic_id is None:
                raise AudienceError(field=f"{field}.topics[{index}]", message=f"Unknown topic '{key}'.")
            topic_ids.append(topic_id)
        # One EXISTS over all the topics: a recipient in two of them is one row.
        included = Q(Exists(TopicMembership.objects.filter(topic_id__in=topic_ids, recipient_id=OuterRef("pk"))))
    else:
        segment = Segment.objects.filter(tenant=tenant, key=value).first() if isinstance(value, str) else None
        if segment is None:
            raise AudienceError(field=f"{field}.segment", message=f"Unknown segment '{value}'.")
        included = segment_filter_compile(tenant=tenant, filter=segment.filter, field=f"{field}.segment")
    if "exclude" in audience:
        excluded = audience_compile(tenant=tenant, audience=audience["exclude"], field=f"{field}.exclude")
        included &= ~excluded
    return included
