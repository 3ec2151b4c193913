"""The OpenAPI schema's view of API key scopes."""

from typing import Any

from drf_spectacular.openapi import AutoSchema

from apps.api.scopes import ANY_KEY, scope_required
from apps.api.serializers import ErrorSerializer


class ScopedAutoSchema(AutoSchema):
    """Documents each operation's required scope (in its description and as
    `x-required-scope`) and its 403 answer."""

    def get_operation(self, *args: Any, **kwargs: Any) -> dict[str, Any] | None:
        operation = super().get_operation(*args, **kwargs)
        if operation is None:
            return None
        scope = scope_required(view=self.view, method=self.method)
        if scope is None:
            return operation
        needs = "Needs only a valid API key." if scope == ANY_KEY else f"Requires the API key scope `{scope}`."
        operation["description"] = f"{operation.get('description', '')}\n\n{needs}".strip()
        operation["x-required-scope"] = scope
        error = self.resolve_serializer(ErrorSerializer, "response")
        operation["responses"].setdefault(
            "403",
            {
                "content": {"application/json": {"schema": error.ref}},
                "description": "The key lacks the required scope (`missing_scope`, naming it), or is limited "
                "to other categories (`category_not_allowed`, naming the field).",
            },
        )
        return operation
