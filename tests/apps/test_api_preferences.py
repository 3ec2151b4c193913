"""The producer API for preferences and consents: read, replace, merge, and bad input named
field by field, with nothing already saved lost."""

import pytest

from tests.factories import RecipientFactory

URL = "/api/v1/recipients/ada/preferences"


@pytest.fixture
def ada(workspace):  # type: ignore[no-untyped-def]
    return RecipientFactory(tenant=workspace.tenant, external_id="ada")


def test_a_recipient_who_never_said_anything_has_the_defaults(api, ada):
    assert api.get(URL).json() == {
        "paused": False,
        "paused_until": None,
        "channels": {},
        "categories": {},
        "channel_order": [],
        "quiet_hours": {},
        "updated_at": None,
    }


def test_put_replaces_and_patch_merges_key_by_key(api, ada):
    full = {
        "channels": {"sms": False},
        "categories": {"digest": {"email": False}},
        "channel_order": ["push", "sms", "email"],
        "quiet_hours": {"start": "22:00", "end": "07:00", "days": [0, 1, 2, 3, 4]},
    }
    assert api.put(URL, full, format="json").status_code == 200
    patched = api.patch(
        URL,
        {"channels": {"push": False}, "categories": {"digest": {"sms": False}, "welcome": {"email": False}}},
        format="json",
    ).json()
    assert patched["channels"] == {"sms": False, "push": False}
    assert patched["categories"] == {"digest": {"email": False, "sms": False}, "welcome": {"email": False}}
    assert patched["quiet_hours"] == full["quiet_hours"]  # untouched by the patch

    # null puts a key back to its default; a whole category too.
    patched = api.patch(URL, {"channels": {"sms": None}, "categories": {"digest": None}}, format="json").json()
    assert (patched["channels"], patched["categories"]) == ({"push": False}, {"welcome": {"email": False}})

    # PUT with less sets the rest back to the defaults.
    replaced = api.put(URL, {"paused": True}, format="json").json()
    assert (replaced["paused"], replaced["channels"], replaced["quiet_hours"]) == (True, {}, {})


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        ({"channels": {"pigeon": False}}, "channels", "'pigeon' is not a channel"),
        ({"channels": {"sms": "no"}}, "channels", "true or false"),
        ({"categories": {"nonexistent": {"email": False}}}, "categories", "Unknown category: nonexistent"),
        ({"quiet_hours": {"start": "22:00"}}, "quiet_hours", "HH:MM"),
        ({"channel_order": ["sms", "sms"]}, "channel_order", "each channel once"),
        ({"paused_until": "soon"}, "paused_until", "Datetime"),
    ],
)
def test_bad_input_names_the_field_and_changes_nothing(api, ada, body, field, words):
    api.put(URL, {"channels": {"email": False}}, format="json")
    response = api.patch(URL, body, format="json")
    assert response.status_code == 400
    [message] = response.json()["error"]["fields"][field]
    assert words in message
    assert api.get(URL).json()["channels"] == {"email": False}


def test_an_unknown_recipient_is_a_404(api, ada):
    assert api.get("/api/v1/recipients/nobody/preferences").status_code == 404
    assert api.post("/api/v1/recipients/nobody/consents", {}, format="json").status_code == 404


def test_consents_keep_their_history_and_show_the_standing_answer(api, ada):
    url = "/api/v1/recipients/ada/consents"
    for channel, granted in (("email", True), ("sms", True), ("email", False)):
        response = api.post(url, {"channel": channel, "granted": granted, "source": "test"}, format="json")
        assert response.status_code == 201
    standing = {c["channel"]: c["granted"] for c in api.get(url).json()}
    assert standing == {"email": False, "sms": True}
    assert ada.consents.count() == 3
    bad = api.post(url, {"channel": "fax", "granted": True}, format="json")
    assert set(bad.json()["error"]["fields"]) == {"channel", "source"}
