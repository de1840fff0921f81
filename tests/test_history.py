"""Channel history on one process, on the real server: offsets, the hello's positions,
resume from since=, POSITION and the history op, gaps, and bad input refused at the edge."""

import json

import pytest
import websocket
from conftest import ask_json, raw_http, upgrade_request, wait_until

import wsboard


def v1(server, client_id, *channels, since=()):
    query = "".join(f"&channel={c}" for c in channels)
    query += "".join(f"&since={s}" for s in since)
    ws = websocket.create_connection(
        server.ws_url(client_id) + query, timeout=10, subprotocols=["wsboard.v1"]
    )
    hello = json.loads(ws.recv())["hello"]
    return ws, hello


def frames(ws, count):
    return [json.loads(ws.recv()) for _ in range(count)]


@pytest.fixture
def history_server(server_factory):
    return server_factory("--history", "3", "--history-ttl", "300")


def test_a_publication_carries_its_offset_and_the_hello_says_where_each_channel_is(
    history_server,
):
    control = history_server.control()
    assert control.ask("PUBLISH news one") == "OK 0"  # nobody there yet: still numbered
    ws, hello = v1(history_server, "reader", "news", "sport")
    epoch = hello["channels"]["news"]["epoch"]
    assert hello["channels"]["news"] == {"epoch": epoch, "offset": 1}
    assert hello["channels"]["sport"]["offset"] == 0
    assert control.ask("PUBLISH news two") == "OK 1"
    assert frames(ws, 1) == [{"seq": None, "data": "two", "offsets": {"news": 2}}]
    assert control.ask("POSITION news") == f"OK {epoch} 2"


def test_a_publication_to_several_channels_comes_once_with_the_offsets_of_its_channels(
    history_server,
):
    both, _ = v1(history_server, "both", "a", "b")
    only_a, _ = v1(history_server, "only-a", "a")
    control = history_server.control()
    answer = ask_json(control, {"op": "publish", "channel": ["a", "b", "c"], "data": "x"})
    assert answer["ok"] and answer["sockets"] == 2
    assert frames(both, 1) == [{"seq": None, "data": "x", "offsets": {"a": 1, "b": 1}}]
    assert frames(only_a, 1) == [{"seq": None, "data": "x", "offsets": {"a": 1}}]
    assert control.ask("PUBLISH b sentinel") == "OK 1"
    assert frames(both, 1)[0]["data"] == "sentinel"  # x came once, not once per channel


def test_a_socket_that_reconnects_with_since_gets_what_it_missed_in_order(history_server):
    ws, hello = v1(history_server, "r", "news")
    epoch = hello["channels"]["news"]["epoch"]
    control = history_server.control()
    control.ask("PUBLISH news 1")
    (first,) = frames(ws, 1)
    ws.close()
    for text in ("2", "3"):
        control.ask(f"PUBLISH news {text}")
    back, hello = v1(
        history_server, "r", "news", since=[f"news:{epoch}:{first['offsets']['news']}"]
    )
    assert hello["channels"]["news"] == {"epoch": epoch, "offset": 3}
    assert [f["data"] for f in frames(back, 2)] == ["2", "3"]
    assert control.ask("PUBLISH news 4") == "OK 1"
    assert frames(back, 1) == [{"seq": None, "data": "4", "offsets": {"news": 4}}]


def test_a_page_rendered_at_a_position_gets_everything_published_after_the_render(
    history_server,
):
    control = history_server.control()
    control.ask("PUBLISH news before")
    position = ask_json(control, {"op": "position", "channel": "news"})
    assert position["ok"] and position["offset"] == 1
    control.ask("PUBLISH news after-the-render")  # before the page's socket is up
    since = f"news:{position['epoch']}:{position['offset']}"
    ws, _ = v1(history_server, "page", "news", since=[since])
    assert frames(ws, 1) == [{"seq": None, "data": "after-the-render", "offsets": {"news": 2}}]


def test_what_was_evicted_or_numbered_in_another_epoch_is_told_as_a_gap(history_server):
    control = history_server.control()
    epoch = ask_json(control, {"op": "position", "channel": "news"})["epoch"]
    for n in range(1, 6):
        control.ask(f"PUBLISH news m{n}")  # --history 3 keeps m3, m4, m5
    ws, _ = v1(history_server, "late", "news", since=[f"news:{epoch}:1"])
    assert frames(ws, 4) == [
        {"gap": {"channel": "news", "after": 1}},
        {"seq": None, "data": "m3", "offsets": {"news": 3}},
        {"seq": None, "data": "m4", "offsets": {"news": 4}},
        {"seq": None, "data": "m5", "offsets": {"news": 5}},
    ]
    other, _ = v1(history_server, "stale", "news", since=["news:0123abcd:4"])
    assert frames(other, 1) == [{"gap": {"channel": "news", "after": 0}}]
    assert [f["data"] for f in frames(other, 3)] == ["m3", "m4", "m5"]
    beyond, _ = v1(history_server, "ahead", "news", since=[f"news:{epoch}:99"])
    control.ask("PUBLISH news m6")
    assert frames(beyond, 1)[0]["data"] == "m6"  # nothing to replay, and no gap


def test_the_history_op_reads_a_channel_with_and_without_since(history_server):
    control = history_server.control()
    for n in range(1, 5):
        control.ask(f"PUBLISH news p{n}")
    page = ask_json(control, {"op": "history", "channel": "news"})
    assert page["ok"] and page["offset"] == 4 and page["gap"] is False
    assert [(p["offset"], p["data"]) for p in page["publications"]] == [
        (2, "p2"),
        (3, "p3"),
        (4, "p4"),
    ]
    epoch = page["epoch"]
    since = {"epoch": epoch, "offset": 2}
    page = ask_json(control, {"op": "history", "channel": "news", "since": since, "limit": 1})
    assert [p["data"] for p in page["publications"]] == ["p3"] and page["gap"] is False
    since = {"epoch": epoch, "offset": 0}
    assert ask_json(control, {"op": "history", "channel": "news", "since": since})["gap"] is True
    last = ask_json(control, {"op": "history", "channel": "news", "limit": 1})
    assert [p["data"] for p in last["publications"]] == ["p4"]


@pytest.mark.parametrize(
    "request_, error",
    [
        ({"op": "history", "channel": "bad name"}, '"channel" must be a channel name'),
        ({"op": "history", "channel": "news", "limit": 10_001}, '"limit" must be'),
        ({"op": "history", "channel": "news", "limit": -1}, '"limit" must be'),
        ({"op": "history", "channel": "news", "limit": True}, '"limit" must be'),
        ({"op": "history", "channel": "news", "since": {"epoch": "XYZ", "offset": 1}}, '"since"'),
        ({"op": "history", "channel": "news", "since": {"epoch": "ab", "offset": -1}}, '"since"'),
        ({"op": "history", "channel": "news", "since": "ab:1"}, '"since"'),
        ({"op": "position"}, '"channel" must be a channel name'),
    ],
)
def test_bad_history_requests_are_refused_with_their_reason(history_server, request_, error):
    answer = ask_json(history_server.control(), request_)
    assert answer["ok"] is False and answer["error"].startswith(error), answer


def test_without_history_position_is_refused_and_frames_are_as_before(server):
    control = server.control()
    assert control.ask("POSITION news") == f"ERROR {wsboard.HISTORY_OFF}"
    assert control.ask("POSITION") == "ERROR Missing channel"
    answer = ask_json(control, {"op": "history", "channel": "news"})
    assert answer == {"ok": False, "error": wsboard.HISTORY_OFF}
    ws, hello = v1(server, "plain-v1", "news")
    assert "channels" not in hello
    control.ask("PUBLISH news x")
    assert frames(ws, 1) == [{"seq": None, "data": "x"}]


@pytest.mark.parametrize(
    "since, reason",
    [
        ("news", "Invalid since"),
        ("news:abc", "Invalid since"),
        ("news:xyz:1", "Invalid since"),
        ("news:abc:-1", "Invalid since"),
        ("news:abc:12345678901234567", "Invalid since"),
        ("bad%20name:abc:1", "Invalid since"),
        ("news:abc:1&since=news:abc:2", "since names channel 'news' twice"),
    ],
)
def test_a_malformed_since_is_a_400_before_the_upgrade(history_server, since, reason):
    answer = raw_http(
        history_server.port, upgrade_request(f"?id=u&channel=news&since={since}")
    ).decode()
    assert answer.startswith("HTTP/1.1 400 ") and reason in answer, answer


def test_history_is_bounded_in_bytes_under_a_flood_to_many_channels(server_factory):
    server = server_factory("--history", "100", "--history-bytes", "200000")
    control = server.control()
    text = "x" * 1000
    for n in range(2000):
        control.send(f"PUBLISH ch{n} {text}\n".encode())
    for _ in range(2000):
        assert control.line() == b"OK 0"
    stats = ask_json(control, {"op": "stats"})
    assert 0 < stats["history_bytes"] <= 200_000, stats
    assert stats["history_channels"] < 2000, stats


def test_the_python_client_reads_positions_and_history(history_server):
    import wsboard_client

    board = wsboard_client.Client(history_server.control_path)
    epoch, offset = board.position("news")
    assert offset == 0
    board.publish("news", "hello")
    assert board.position("news") == (epoch, 1)
    page = board.history("news", since=(epoch, 0))
    assert page["publications"] == [{"offset": 1, "data": "hello"}] and page["gap"] is False
    with pytest.raises(wsboard_client.CommandError):
        board.history("news", limit=10_001)


# Sticky joins: the backend's JOIN of an id that holds for its sockets opened later.


def test_a_sticky_join_puts_later_sockets_in_before_their_first_frame(history_server):
    control = history_server.control()
    join = {"op": "join", "channel": "news", "id": "sam", "sticky": True}
    assert ask_json(control, join) == {"ok": True, "sockets": 0}  # no socket yet: no error
    control.ask("PUBLISH news before-sam")
    first, hello = v1(history_server, "sam")  # names no channel in its URL
    assert hello["channels"]["news"]["offset"] == 1  # in it before the hello was made
    epoch = hello["channels"]["news"]["epoch"]
    assert control.ask("PUBLISH news one") == "OK 1"
    assert frames(first, 1)[0]["data"] == "one"
    first.close()
    control.ask("PUBLISH news while-away")
    again, _ = v1(history_server, "sam", since=[f"news:{epoch}:2"])
    assert frames(again, 1)[0]["data"] == "while-away"  # the resume covers the sticky channel
    assert control.ask("LEAVE news sam") == "OK 1"
    third, hello = v1(history_server, "sam")
    assert "news" not in hello["channels"]
    assert control.ask("PUBLISH news after-leave") == "OK 0"


def test_a_leave_ends_a_sticky_join_of_an_id_with_no_socket(history_server):
    control = history_server.control()
    join = {"op": "join", "channel": "news", "id": "gone", "sticky": True}
    assert ask_json(control, join)["ok"]
    assert control.ask("LEAVE news gone") == "OK 0"  # ended, though no socket was in it
    assert ask_json(control, {"op": "stats"})["sticky_ids"] == 0
    assert control.ask("LEAVE news gone") == "ERROR Client Not Found"


def test_sticky_joins_end_session_ttl_after_the_ids_last_socket(server_factory):
    server = server_factory("--history", "5", "--session-ttl", "1", "--ping-interval", "1")
    control = server.control()
    for client_id in ("kept", "never-came"):
        join = {"op": "join", "channel": "news", "id": client_id, "sticky": True}
        assert ask_json(control, join)["ok"]
    ws, hello = v1(server, "kept")
    assert "news" in hello["channels"]
    assert ask_json(control, {"op": "stats"})["sticky_away"] == 1  # never-came
    ws.close()
    wait_until(lambda: ask_json(control, {"op": "stats"})["sticky_ids"] == 0, timeout=10)
    ws, hello = v1(server, "kept")
    assert "news" not in hello["channels"]


@pytest.mark.parametrize(
    "request_, error",
    [
        ({"op": "join", "channel": "news", "id": "a", "sticky": "yes"}, '"sticky" must be'),
        ({"op": "join", "channel": "news", "conn": "1.2", "sticky": True}, '"sticky" must be'),
    ],
)
def test_bad_sticky_joins_are_refused(history_server, request_, error):
    answer = ask_json(history_server.control(), request_)
    assert answer["ok"] is False and answer["error"].startswith(error), answer


def test_sticky_joins_are_bounded_in_ids_and_channels(server_factory):
    server = server_factory("--max-sticky-ids", "2", "--max-channels-per-socket", "2")
    control = server.control()

    def sticky(channel, client_id):
        return ask_json(
            control, {"op": "join", "channel": channel, "id": client_id, "sticky": True}
        )

    assert sticky("a", "one")["ok"] and sticky("b", "one")["ok"] and sticky("a", "two")["ok"]
    assert sticky("c", "one")["error"].startswith(wsboard.TOO_MANY_STICKY)  # its 3rd channel
    assert sticky("a", "three")["error"].startswith(wsboard.TOO_MANY_STICKY)  # a 3rd id
    assert sticky("b", "one")["ok"]  # again: nothing new
