"""The hub contract, written once and run against every hub in wsboard.HUBS.

A hub is the only way to the sockets, so these tests drive it in-process with sockets that
record the frames they are given; the wire itself is tested on real sockets elsewhere.
"""

import json
import time

import pytest
from conftest import RecordingSocket, handshake, new_prefix, start_hub

import wsboard

started: list = []  # the hubs a test made, stopped after it
redis_url: list = []  # the session's redis-server, once a redis test asked for it


@pytest.fixture(params=sorted(wsboard.HUBS))
def hub_name(request):
    """Each test runs once per hub; the redis one against a real redis-server."""
    if request.param == "redis" and not redis_url:
        redis_url.append(request.getfixturevalue("redis_server").url)
    yield request.param
    while started:
        started.pop().stop()


def make_hub(name, events=None, **settings):
    if name == "redis":
        settings = {"redis": redis_url[0], "redis_prefix": new_prefix(), **settings}
    hub = wsboard.HUBS[name](wsboard.Config(**settings), events)
    started.append(start_hub(hub))
    return hub


@pytest.fixture
def hub(hub_name):
    return make_hub(hub_name)


counter = iter(range(1, 1_000_000))


def connect(hub, client_id, ip="10.0.0.1", subprotocol="", channels=()):
    """Admit and attach a socket, as the handshake does; return the connection."""
    hs = handshake(client_id, ip, subprotocol, channels=channels)
    assert hub.admit(hs) is None
    ws = RecordingSocket()
    conn = wsboard.Connection(
        client_id, f"{hub.node}.{next(counter)}", hs.peer, ip, ws, wsboard.FRAMINGS[subprotocol]
    )
    opening = hub.attach(conn, hs)
    ws.write_frames(opening)
    hub.sync()  # what the attach set going (presence) is in force everywhere
    return conn


def detach(hub, conn):
    hub.detach(conn)
    hub.sync()


def test_a_send_reaches_every_socket_of_the_id_and_no_other(hub):
    tabs = [connect(hub, "a") for _ in range(3)]
    other = connect(hub, "b")
    result = hub.send(["a"], "hello", keep_offline=False)
    assert (result.sockets, result.queued, result.missing) == (3, 0, [])
    assert [tab.ws.texts() for tab in tabs] == [["hello"]] * 3
    assert other.ws.texts() == []


def test_a_send_to_an_id_with_no_socket_is_missing(hub):
    result = hub.send(["nobody"], "x", keep_offline=False)
    assert (result.sockets, result.queued, result.missing) == (0, 0, ["nobody"])


def test_a_detached_socket_is_gone_from_sends_and_listings(hub):
    gone, kept = connect(hub, "gone"), connect(hub, "kept")
    detach(hub, gone)
    detach(hub, gone)  # twice: no harm
    assert hub.send(["gone"], "x", keep_offline=False).missing == ["gone"]
    assert [row.client_id for row in hub.clients()] == ["kept"]
    assert hub.local_count() == 1 and kept.ws.texts() == []


def test_a_closing_socket_is_neither_listed_nor_reached(hub):
    closing = connect(hub, "closing")
    closing.ws.closed = True  # e.g. cut for a full send queue, its session not yet over
    assert hub.clients() == []
    assert hub.send(["closing"], "x", keep_offline=False).sockets == 0
    assert hub.local_count() == 1  # it still holds its descriptor until its session ends


def test_listings_carry_id_connection_id_peer_and_protocol(hub):
    conn = connect(hub, "v1er", ip="10.0.0.9", subprotocol="wsboard.v1")
    (row,) = hub.clients()
    assert (row.client_id, row.conn_id, row.peer, row.protocol) == (
        "v1er",
        conn.conn_id,
        "10.0.0.9:1",
        "wsboard.v1",
    )


def test_a_broadcast_reaches_every_open_socket_once(hub):
    conns = [connect(hub, f"c{n}") for n in range(5)]
    conns[0].ws.closed = True
    assert hub.broadcast("all") == 4
    assert [c.ws.texts() for c in conns[1:]] == [["all"]] * 4


def test_a_kick_ends_every_socket_of_the_id_with_its_code(hub):
    a1, a2, b = connect(hub, "a"), connect(hub, "a"), connect(hub, "b")
    assert hub.kick("a", 4001, "bye") == 2
    assert (a1.ws.close_code, a2.ws.close_code, b.ws.close_code) == (4001, 4001, None)
    assert a1.ws.end_reason is wsboard.EndReason.KICKED
    assert hub.kick("nobody", 4000, "kicked") == 0


def test_limits_count_every_attached_socket(hub_name):
    hub = make_hub(hub_name, max_connections=3, max_connections_per_ip=2, max_sockets_per_id=1)
    connect(hub, "a", ip="10.0.0.1")
    assert hub.admit(handshake("a", ip="10.0.0.2")).reason.startswith("Too many sockets for")
    connect(hub, "b", ip="10.0.0.1")
    assert "this address" in hub.admit(handshake("c", ip="10.0.0.1")).reason
    connect(hub, "c", ip="10.0.0.2")
    refusal = hub.admit(handshake("d", ip="10.0.0.3"))
    assert refusal.status == 503 and refusal.reason == "Too many connections (limit 3)"


def test_a_keyed_send_is_delivered_once_and_a_retry_gets_the_first_result(hub):
    tab = connect(hub, "a")
    first = hub.send(["a"], "once", keep_offline=False, key="k1")
    again = hub.send(["a"], "once", keep_offline=False, key="k1")
    assert tab.ws.texts() == ["once"]
    assert (first.duplicate, again.duplicate, again.sockets) == (False, True, 1)


def test_a_failed_keyed_send_may_be_tried_again(hub):
    assert hub.send(["late"], "x", keep_offline=False, key="k2").missing == ["late"]
    tab = connect(hub, "late")
    assert hub.send(["late"], "x", keep_offline=False, key="k2").duplicate is False
    assert tab.ws.texts() == ["x"]


def test_frames_held_in_a_batch_go_out_together_and_in_order(hub):
    a = connect(hub, "a")
    batch = wsboard.Batch()
    hub.send(["a"], "1", keep_offline=False, batch=batch)
    hub.send(["a"], "2", keep_offline=False, batch=batch)
    assert a.ws.texts() == []  # held
    hub.broadcast("3", batch)  # behind what is held for a, never before it
    batch.release()
    assert a.ws.texts() == ["1", "2", "3"]


def test_a_broadcast_in_a_batch_passes_straight_to_sockets_with_nothing_held(hub):
    a, b = connect(hub, "a"), connect(hub, "b")
    batch = wsboard.Batch()
    hub.send(["a"], "held", keep_offline=False, batch=batch)
    hub.broadcast("now", batch)
    assert (a.ws.texts(), b.ws.texts()) == ([], ["now"])
    batch.release()
    assert a.ws.texts() == ["held", "now"]


def test_v1_sockets_get_a_hello_then_numbered_frames(hub_name):
    hub = make_hub(hub_name, inbox=10)
    conn = connect(hub, "v", subprotocol="wsboard.v1")
    hello = json.loads(conn.ws.texts()[0])["hello"]
    assert hello["inbox"] is True and hello["seq"] == 0
    hub.send(["v"], "hi", keep_offline=False)
    assert json.loads(conn.ws.texts()[1]) == {"seq": 1, "data": "hi"}


def test_what_was_queued_offline_reaches_the_next_plain_socket_once(hub_name):
    hub = make_hub(hub_name, inbox=10)
    result = hub.send(["p"], "while away", keep_offline=True)
    assert (result.sockets, result.queued) == (0, 1)
    first = connect(hub, "p")
    second = connect(hub, "p")
    assert first.ws.texts() == ["while away"] and second.ws.texts() == []


def test_what_was_delivered_is_not_replayed_to_a_plain_socket(hub_name):
    hub = make_hub(hub_name, inbox=10)
    tab = connect(hub, "p")
    hub.send(["p"], "seen", keep_offline=True)
    detach(hub, tab)
    assert connect(hub, "p").ws.texts() == []


def test_stats_count_open_sockets(hub):
    connect(hub, "a")
    closing = connect(hub, "b")
    closing.ws.closed = True
    assert hub.stats()["sockets"] == 1


# Channels ####################################################################


def test_sockets_named_channels_at_connect_are_in_them_before_any_frame(hub):
    a = connect(hub, "a", channels=["room", "lobby"])
    b = connect(hub, "b", channels=["room"])
    connect(hub, "c")
    assert hub.publish(["room"], "hi") == 2
    assert hub.publish(["lobby"], "only a") == 1
    assert a.ws.texts() == ["hi", "only a"] and b.ws.texts() == ["hi"]


def test_join_and_leave_act_on_every_open_socket_of_the_id(hub):
    tabs = [connect(hub, "u") for _ in range(3)]
    assert hub.join("room", client_id="u") == (3, 3)
    assert hub.join("room", client_id="u") == (3, 3)  # joining again changes nothing
    assert hub.count("room") == (3, 1)
    assert hub.leave("room", client_id="u") == (3, 3)
    assert hub.count("room") == (0, 0) and hub.channels() == {}
    assert hub.join("room", client_id="nobody") == (0, 0)
    assert all(tab.ws.texts() == [] for tab in tabs)


def test_join_and_leave_by_connection_id_reach_one_socket(hub):
    one, other = connect(hub, "u"), connect(hub, "u")
    assert hub.join("room", conn_id=one.conn_id) == (1, 1)
    assert hub.publish(["room"], "x") == 1
    assert (one.ws.texts(), other.ws.texts()) == (["x"], [])
    assert hub.join("room", conn_id="9.9") == (0, 0)


def test_a_publish_to_several_channels_reaches_each_socket_once(hub):
    both = connect(hub, "both", channels=["a", "b"])
    connect(hub, "just-a", channels=["a"])
    assert hub.publish(["a", "b"], "once") == 2
    assert both.ws.texts() == ["once"]


def test_a_publish_can_leave_out_the_sender(hub):
    sender = connect(hub, "s", channels=["room"])
    other = connect(hub, "o", channels=["room"])
    assert hub.publish(["room"], "to others", except_conn=sender.conn_id) == 1
    assert (sender.ws.texts(), other.ws.texts()) == ([], ["to others"])


def test_membership_ends_with_the_socket(hub):
    gone = connect(hub, "g", channels=["room"])
    detach(hub, gone)
    assert hub.publish(["room"], "x") == 0
    assert hub.channels() == {} and hub.channel_clients("room") == []


def test_a_socket_is_in_at_most_max_channels(hub_name):
    hub = make_hub(hub_name, max_channels_per_socket=2)
    conn = connect(hub, "u", channels=["a", "b"])
    assert hub.join("c", client_id="u") == (1, 0)
    assert sorted(conn.channels) == ["a", "b"]


def test_online_and_count_tell_who_is_connected(hub):
    connect(hub, "a")
    connect(hub, "a")
    connect(hub, "b", channels=["room"])
    assert hub.online(["b", "nobody", "a", "b"]) == ["b", "a"]
    assert hub.count() == (3, 2) and hub.count("room") == (1, 1)


def test_channel_listings_show_members_and_counts(hub):
    a = connect(hub, "a", channels=["room"])
    connect(hub, "b", channels=["room", "hall"])
    assert [r.conn_id for r in hub.channel_clients("room")][0] == a.conn_id
    assert hub.channels() == {"room": 2, "hall": 1}


def test_a_send_and_a_kick_by_connection_id_reach_that_socket_only(hub):
    one, other = connect(hub, "u"), connect(hub, "u")
    assert hub.send_to_connection(one.conn_id, "just you") == 1
    assert (one.ws.texts(), other.ws.texts()) == (["just you"], [])
    assert hub.kick_connection(other.conn_id, 4000, "kicked") == 1
    assert (one.ws.close_code, other.ws.close_code) == (None, 4000)
    assert hub.send_to_connection(other.conn_id, "x") == 0


def test_v1_hello_carries_the_connection_id(hub):
    conn = connect(hub, "v", subprotocol="wsboard.v1")
    assert json.loads(conn.ws.texts()[0])["hello"]["conn"] == conn.conn_id


# Presence ####################################################################


class RecordingSink:
    def __init__(self) -> None:
        self.events: list = []

    def push(self, line: str, lifecycle: bool) -> None:
        self.events.append(json.loads(line))

    def kinds(self) -> list:
        return [(e["event"], e.get("channel"), e.get("id")) for e in self.events]


def presence_hub(hub_name, grace):
    sink = RecordingSink()
    events = wsboard.Events()
    events.add(sink)
    return make_hub(hub_name, events, presence_grace=grace), sink


def frames_of(conn) -> list:
    return [json.loads(text) for text in conn.ws.texts()]


def test_a_member_is_an_id_not_a_socket(hub_name):
    hub, sink = presence_hub(hub_name, 0)
    watcher = connect(hub, "w", subprotocol="wsboard.v1", channels=["presence-room"])
    tabs = [
        connect(hub, "u", subprotocol="wsboard.v1", channels=["presence-room"]) for _ in range(3)
    ]
    joins = [f for f in frames_of(watcher) if "join" in f.get("presence", {})]
    assert joins == [{"presence": {"channel": "presence-room", "join": {"id": "u", "meta": None}}}]
    assert [m["id"] for m in hub.presence("presence-room")] == ["w", "u"]
    assert sink.kinds().count(("join", "presence-room", "u")) == 1
    for tab in tabs[:2]:
        detach(hub, tab)
    assert not [f for f in frames_of(watcher) if "leave" in f.get("presence", {})]
    detach(hub, tabs[2])
    leaves = [f for f in frames_of(watcher) if "leave" in f.get("presence", {})]
    assert leaves == [{"presence": {"channel": "presence-room", "leave": {"id": "u"}}}]
    assert ("leave", "presence-room", "u") in sink.kinds()


def test_a_joining_v1_socket_gets_the_member_list(hub_name):
    hub, _ = presence_hub(hub_name, 0)
    connect(hub, "a", channels=["presence-room"])  # a plain socket: a member, told nothing
    newcomer = connect(hub, "b", subprotocol="wsboard.v1", channels=["presence-room"])
    hello, members = frames_of(newcomer)
    assert "hello" in hello
    assert members == {
        "presence": {
            "channel": "presence-room",
            "members": [{"id": "a", "meta": None}, {"id": "b", "meta": None}],
        }
    }


def test_a_reload_within_the_grace_is_no_leave_and_no_join(hub_name):
    hub, sink = presence_hub(hub_name, 0.3)
    watcher = connect(hub, "w", subprotocol="wsboard.v1", channels=["presence-room"])
    page = connect(hub, "u", channels=["presence-room"])
    detach(hub, page)
    connect(hub, "u", channels=["presence-room"])  # the reloaded page
    time.sleep(0.5)
    hub.sync()
    changes = [f["presence"] for f in frames_of(watcher) if "presence" in f][1:]
    assert changes == [{"channel": "presence-room", "join": {"id": "u", "meta": None}}]
    assert sink.kinds().count(("join", "presence-room", "u")) == 1
    assert ("leave", "presence-room", "u") not in sink.kinds()


def test_a_leave_comes_after_the_grace(hub_name):
    hub, sink = presence_hub(hub_name, 0.2)
    page = connect(hub, "u", channels=["presence-room"])
    detach(hub, page)
    assert ("leave", "presence-room", "u") not in sink.kinds()
    time.sleep(0.4)
    hub.sync()
    assert ("leave", "presence-room", "u") in sink.kinds()


def test_join_and_leave_by_the_backend_count_as_presence(hub_name):
    hub, sink = presence_hub(hub_name, 0)
    watcher = connect(hub, "w", subprotocol="wsboard.v1", channels=["presence-room"])
    connect(hub, "u")
    hub.join("presence-room", client_id="u")
    hub.leave("presence-room", client_id="u")
    hub.sync()
    changes = [f["presence"] for f in frames_of(watcher)[2:]]
    assert [next(k for k in c if k != "channel") for c in changes] == ["join", "leave"]
    assert sink.kinds()[-2:] == [("join", "presence-room", "u"), ("leave", "presence-room", "u")]


def test_metadata_shows_in_members_and_listings_and_goes_with_the_id(hub_name):
    hub, _ = presence_hub(hub_name, 0)
    page = connect(hub, "u", channels=["presence-room"])
    assert hub.set_meta("nobody", {"name": "x"}) == 0
    assert hub.set_meta("u", {"name": "Ada"}) == 1
    assert hub.presence("presence-room") == [{"id": "u", "meta": {"name": "Ada"}}]
    assert hub.clients()[0].meta == {"name": "Ada"}
    detach(hub, page)
    connect(hub, "u")
    assert hub.clients()[0].meta is None  # it did not outlive the id's sockets


def test_metadata_survives_a_reload_within_the_grace(hub_name):
    hub, _ = presence_hub(hub_name, 0.3)
    page = connect(hub, "u")
    hub.set_meta("u", {"name": "Ada"})
    detach(hub, page)
    connect(hub, "u")
    time.sleep(0.5)
    hub.sync()
    assert hub.clients()[0].meta == {"name": "Ada"}


def test_presence_leaves_nothing_behind_when_every_socket_goes(hub_name):
    hub, _ = presence_hub(hub_name, 0)
    conns = [connect(hub, f"u{n % 3}", channels=["presence-room"]) for n in range(9)]
    assert [m["id"] for m in hub.presence("presence-room")] == ["u0", "u1", "u2"]
    for conn in conns:
        detach(hub, conn)
    assert hub.presence("presence-room") == [] and hub.channels() == {}


def protocol_members(protocol) -> set:
    return {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)


def test_every_hub_implements_the_hub_contract(hub):
    assert isinstance(hub, wsboard.Hub)
    assert all(hasattr(hub, name) for name in protocol_members(wsboard.Hub))


def test_a_hub_touches_only_what_socket_like_lists_and_boardsocket_offers_it():
    import socket

    recording, real = RecordingSocket(), None
    assert isinstance(recording, wsboard.SocketLike)
    one, other = socket.socketpair()
    try:
        real = wsboard.BoardSocket(
            one, wsboard.SocketReader(one, b""), wsboard.Config(), wsboard.WebSocketProtocol()
        )
        assert isinstance(real, wsboard.SocketLike)
        assert all(hasattr(real, name) for name in protocol_members(wsboard.SocketLike))
    finally:
        one.close()
        other.close()


def test_a_socket_is_no_cycle_so_it_is_freed_when_let_go_not_by_the_collector():
    """The stock __init__ kept a bound method of the socket on the socket: every closed socket
    was a cycle of 7 objects that waited for a full collection, or for ever once the collector had
    frozen it (10,000 sockets, a fifth replaced 20 times: 16.4 MB more RSS, 8.4 MB without it)."""
    import socket
    import sys

    one, other = socket.socketpair()
    try:
        ws = wsboard.BoardSocket(
            one, wsboard.SocketReader(one, b""), wsboard.Config(), wsboard.WebSocketProtocol()
        )
        ws.open([])
        ws.send_frame("hi", ws.OPCODE_TEXT)  # the stock send_frame, through raw_write
        other.settimeout(5)
        assert other.recv(16) == b"\x81\x02hi"
        assert sys.getrefcount(ws) == 2  # this name and the call's argument: nothing else
    finally:
        one.close()
        other.close()


def attributes_used(cls, name: str) -> set:
    """Every attribute that cls's code reads of the object it calls name (self.name, name)."""
    import inspect
    import re

    source = inspect.getsource(cls)
    return set(re.findall(rf"\b(?:self\.)?{name}\.([a-z_]+)", source))


def test_the_backplane_and_its_transport_meet_only_where_transport_says():
    """The seam a NATS or LISTEN/NOTIFY bus would plug into: the backplane calls of its
    transport only what Transport lists, and RedisTransport calls back only what the
    Transport docstring names (besides the settings the backplane holds)."""
    transport_members = protocol_members(wsboard.Transport)
    assert attributes_used(wsboard.Backplane, "transport") <= transport_members
    methods = transport_members - set(wsboard.Transport.__annotations__)  # the rest: data
    assert all(hasattr(wsboard.RedisTransport, n) for n in methods)
    callbacks = {"heard", "burst_done", "link_came_up", "link_went_down", "wanted_routes"}
    assert attributes_used(wsboard.RedisTransport, "backplane") <= callbacks | {
        "cfg",
        "node",
        "events",
    }
    assert all(hasattr(wsboard.Backplane, n) for n in callbacks)
    hooks = protocol_members(wsboard.LocalHooks)
    assert all(hasattr(wsboard.Backplane, n) and hasattr(wsboard.LocalHub, n) for n in hooks)


def test_a_redis_hub_is_a_backplane_whose_local_part_calls_it_back(hub_name):
    hub = make_hub(hub_name)
    if hub_name == "local":
        assert hub.hooks is hub
        return
    assert isinstance(hub, wsboard.Backplane) and isinstance(hub.transport, wsboard.RedisTransport)
    assert hub.here.hooks is hub and hub.here.registry is hub.registry
    assert hub.here.inbox is hub.inbox
