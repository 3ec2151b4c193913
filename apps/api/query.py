"""Query parameters are checked, never ignored: a view takes the filters its
`filter_serializer_class` names (on its list) and its paginator's, or on its other actions the
options its `query_serializer_class` names, nothing else. Any other, or a malformed one, is
refused with a 400 naming it."""

from typing import Any

from rest_framework import exceptions, generics, pagination, serializers
from rest_framework.request import Request
from rest_framework.views import APIView

INVALID_CURSOR = "Not a cursor this API gave: follow a page's `next` or `previous` link."


class CheckedCursorPagination(pagination.CursorPagination):
    """Cursor pages whose `cursor` and page size are checked: a bad one is a 400 naming it,
    not a 404 (a bad cursor) or the default page size (a bad size)."""

    def get_page_size(self, request: Request) -> int | None:
        if self.page_size_query_param and self.page_size_query_param in request.query_params:
            size = serializers.IntegerField(min_value=1, max_value=self.max_page_size)
            try:
                return size.run_validation(request.query_params[self.page_size_query_param])
            except exceptions.ValidationError as error:
                raise exceptions.ValidationError({self.page_size_query_param: error.detail})
        return super().get_page_size(request)

    def decode_cursor(self, request: Request) -> pagination.Cursor | None:
        try:
            return super().decode_cursor(request)
        except exceptions.NotFound:
            raise exceptions.ValidationError({self.cursor_query_param: [INVALID_CURSOR]})

    def query_parameters(self) -> set[str]:
        """The query parameters this paginator reads."""
        return {self.cursor_query_param, *([self.page_size_query_param] if self.page_size_query_param else [])}

    def get_schema_operation_parameters(self, view: Any) -> list[dict[str, Any]]:
        parameters = super().get_schema_operation_parameters(view)
        for parameter in parameters:
            if parameter["name"] == self.page_size_query_param:
                parameter["schema"] = {"type": "integer", "minimum": 1, "maximum": self.max_page_size}
        return parameters


class QueryCheckedView(APIView):
    """The base of every API view: refuses query parameters it does not take, and puts the
    validated filters of a list in `self.filters`."""

    filter_serializer_class: type[serializers.Serializer] | None = None
    # The query parameters of a view that is not a list, validated into `self.filters` as well.
    query_serializer_class: type[serializers.Serializer] | None = None
    filters: dict[str, Any]

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        self.filters = {}
        lists = getattr(self, "action", None) == "list" or isinstance(self, generics.ListAPIView)
        paginator = getattr(self, "paginator", None) if lists else None
        checked = self.filter_serializer_class if lists else self.query_serializer_class
        taken = set(checked().fields) if checked else set()
        if isinstance(paginator, CheckedCursorPagination):
            taken |= paginator.query_parameters()
        if unknown := sorted(set(request.query_params) - taken):
            takes = f"This endpoint takes {', '.join(sorted(taken))}." if taken else "This endpoint takes none."
            raise exceptions.ValidationError({name: [f"Unknown query parameter. {takes}"] for name in unknown})
        if checked:
            # A plain dict, not the QueryDict: DRF reads a blank value in one as left out, as
            # HTML forms mean it, where here it is a value to check.
            filters = checked(data=request.query_params.dict())
            filters.is_valid(raise_exception=True)
            self.filters = dict(filters.validated_data)
