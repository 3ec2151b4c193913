"""What each API key may do: every producer view declares the scope each HTTP method needs
(`required_scopes`), and a view that declares none is refused, so a new endpoint cannot ship
open by omission. A key limited to categories may touch only those categories' objects."""

from collections.abc import Mapping
from typing import Any

from rest_framework import exceptions, permissions
from rest_framework.request import Request

from apps.tenants.models import ApiKey, Scope

# Declared by operations that only need a valid key, such as a key reading or rotating itself.
ANY_KEY = "any key"
WRITE_METHODS = ("POST", "PUT", "PATCH", "DELETE")


def read_write(*, read: Scope, write: Scope) -> dict[str, str]:
    """`required_scopes` for a resource: GET needs `read`, every writing method `write`."""
    return {"GET": read.value, **{method: write.value for method in WRITE_METHODS}}


def scope_required(*, view: object, method: str) -> str | None:
    """The scope the view declares for the method (HEAD as GET), or None when it declares none."""
    declared: Mapping[str, str] = getattr(view, "required_scopes", None) or {}
    method = method.upper()
    return declared.get("GET" if method == "HEAD" else method)


class MissingScope(exceptions.PermissionDenied):
    default_code = "missing_scope"

    def __init__(self, *, scope: str) -> None:
        super().__init__(f"This API key lacks the scope '{scope}'.")
        self.error_extra = {"scope": str(scope)}


class ScopeUndeclared(exceptions.PermissionDenied):
    default_code = "scope_undeclared"

    def __init__(self, *, method: str) -> None:
        super().__init__(f"This endpoint declares no API key scope for {method}, so it is refused.")


class CategoryNotAllowed(exceptions.PermissionDenied):
    """A category-limited key asked for another category; `field` is the request path at fault."""

    default_code = "category_not_allowed"

    def __init__(self, *, field: str, category_key: str) -> None:
        message = f"This API key may not use the category '{category_key}'."
        super().__init__(message)
        self.fields = {field: [message]}


def category_check(*, api_key: ApiKey, category_key: str, field: str = "category") -> None:
    """Raise CategoryNotAllowed unless the key may use the category."""
    if not api_key.allows_category(category_key):
        raise CategoryNotAllowed(field=field, category_key=category_key)


class HasRequiredScope(permissions.BasePermission):
    """A tenant API key holding the scope the view declares for the request's method; for an
    object with a category, a key limited to categories must include it."""

    def has_permission(self, request: Request, view: object) -> bool:
        key = request.auth
        if not isinstance(key, ApiKey):
            return False  # DRF answers 401: no key was given
        method = request.method or ""
        scope = scope_required(view=view, method=method)
        if scope is None:
            raise ScopeUndeclared(method=method)
        if scope != ANY_KEY and not key.has_scope(scope):
            raise MissingScope(scope=scope)
        return True

    def has_object_permission(self, request: Request, view: object, obj: Any) -> bool:
        category = getattr(obj, "category", None)
        if isinstance(request.auth, ApiKey) and category is not None:
            category_check(api_key=request.auth, category_key=category.key)
        return True
