from apps.recipients.models import Recipient


def test_create_then_upsert_by_external_id(api, workspace):
    created = api.post("/api/v1/recipients", {"external_id": "ada", "email": "ada@example.com"}, format="json")
    assert created.status_code == 201
    updated = api.post("/api/v1/recipients", {"external_id": "ada", "locale": "fr"}, format="json")
    assert updated.status_code == 200
    assert updated.json()["email"] == "ada@example.com"
    assert updated.json()["locale"] == "fr"
    assert Recipient.objects.filter(tenant=workspace.tenant).count() == 1


def test_read_update_replace_and_delete(api, workspace):
    api.post(
        "/api/v1/recipients", {"external_id": "u/1", "email": "u@example.com", "timezone": "Asia/Tokyo"}, format="json"
    )
    assert api.get("/api/v1/recipients/u/1").json()["external_id"] == "u/1"  # ids may hold slashes
    api.post(
        "/api/v1/recipients", {"external_id": "u1", "email": "u@example.com", "timezone": "Asia/Tokyo"}, format="json"
    )
    assert api.get("/api/v1/recipients/u1").json()["timezone"] == "Asia/Tokyo"

    patched = api.patch("/api/v1/recipients/u1", {"attributes": {"plan": "pro"}}, format="json")
    assert patched.status_code == 200
    assert patched.json()["attributes"] == {"plan": "pro"}
    assert patched.json()["email"] == "u@example.com"

    put_new = api.put("/api/v1/recipients/u2", {"email": "two@example.com"}, format="json")
    assert put_new.status_code == 201

    assert api.delete("/api/v1/recipients/u1").status_code == 204
    assert api.get("/api/v1/recipients/u1").status_code == 404
    assert [r["external_id"] for r in api.get("/api/v1/recipients").json()["results"]] == ["u2", "u/1"]


def test_patch_of_a_missing_recipient_is_404(api, workspace):
    assert api.patch("/api/v1/recipients/ghost", {"email": "g@example.com"}, format="json").status_code == 404


def test_bad_fields_are_named(api, workspace):
    response = api.post(
        "/api/v1/recipients", {"external_id": "x", "timezone": "Nowhere/City", "email": "no"}, format="json"
    )
    assert response.status_code == 400
    assert set(response.json()["error"]["fields"]) == {"timezone", "email"}
    assert api.post("/api/v1/recipients", {"email": "a@b.io"}, format="json").json()["error"]["fields"] == {
        "external_id": ["This field is required."]
    }
    assert not Recipient.objects.exists()
