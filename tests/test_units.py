"""The pure parts of wsboard, called directly: no sockets."""

import io
import json
import os
import struct
import time

import pytest
from conftest import RecordingSocket, handshake
from gevent.pywsgi import WSGIHandler
from hypothesis import given, settings
from hypothesis import strategies as st

import wsboard
from wsboard import Command, parse_control_line

# Control line parser ##########################################################


def test_list_websockets_parses():
    assert parse_control_line(b"LIST WEBSOCKETS") == Command("list")


def test_a_trailing_carriage_return_is_ignored():
    assert parse_control_line(b"LIST WEBSOCKETS\r") == Command("list")
    assert parse_control_line(b"SEND MESSAGE a hi\r") == Command("send", ("a", "hi"))


def test_send_message_keeps_spaces_in_the_text():
    command = parse_control_line(b"SEND MESSAGE abc  two  spaces and a tail ")
    assert command == Command("send", ("abc", " two  spaces and a tail "))


def test_send_message_keeps_utf8_in_the_text():
    line = 'SEND MESSAGE id1 {"message":"h\u00e9llo \u2603 \U0001f600"}'.encode()
    assert parse_control_line(line) == Command(
        "send", ("id1", '{"message":"h\u00e9llo \u2603 \U0001f600"}')
    )


@pytest.mark.parametrize(
    "line, error",
    [
        (b"SEND MESSAGE abc", "Missing message text"),
        (b"SEND MESSAGE abc ", "Missing message text"),
        (b"SEND MESSAGE  text", "Missing client id"),
        (b"SEND MESSAGE a<b text", "Invalid client id"),
        (b"SEND MESSAGE \xc3\xa9 text", "Invalid client id"),
        (b"SEND MESSAGE abc \xff\xfe", "Message is not valid UTF-8"),
        (b"", "Unknown command"),
        (b"list websockets", "Unknown command"),
        (b"LIST WEBSOCKETS NOW", "Unknown command"),
        (b"SEND abc hi", "Unknown command"),
        (b"\x00\x01\x02", "Unknown command"),
    ],
)
def test_bad_control_lines_are_refused_with_a_reason(line, error):
    assert parse_control_line(line) == Command("error", (error,))


def reference_parse(line: bytes) -> Command:
    """The parser as it was before it found verbs by their first word: split the line, try
    the two-word verb, then the one-word one; ids decoded, then matched as text."""

    def client_id(raw: bytes):
        raw = raw.rstrip(b" ")
        if not raw:
            return Command("error", ("Missing client id",))
        try:
            value = raw.decode("ascii")
        except UnicodeDecodeError:
            return Command("error", ("Invalid client id",))
        valid = wsboard.is_valid_client_id(value)
        return value if valid else Command("error", ("Invalid client id",))

    if line.endswith(b"\r"):
        line = line[:-1]
    if line.startswith(b"{"):
        return Command("json", (line,))
    words = line.split(b" ", 2)
    for count in (2, 1):
        key = b" ".join(words[:count])
        verb = wsboard.VERBS.get(key) if len(words) >= count else None
        if verb is None:
            continue
        readers = [client_id if r is wsboard.id_arg else r for r in verb.args]
        rest, args = line[len(key) + 1 :], []
        if not readers:
            unknown = Command("error", ("Unknown command",))
            return Command(verb.name) if not rest.strip(b" ") else unknown
        for n, read in enumerate(readers):
            raw, rest = rest.partition(b" ")[::2] if n < len(readers) - 1 else (rest, b"")
            value = read(raw)
            if isinstance(value, Command):
                return value
            args.append(value)
        return Command(verb.name, tuple(args))
    return Command("error", ("Unknown command",))


CONTROL_WORDS = st.sampled_from(
    [*(key for key in wsboard.VERBS), b"LIST", b"SEND", b"MESSAGE", b"CHANNELS", b"a", b"x.y:z",
     b"news", b"a<b", b"\xc3\xa9", b"\xff", b"{", b"", b"\r", b"LIST  WEBSOCKETS", b"PINGX"]
)  # fmt: skip


@settings(max_examples=500, deadline=None)
@given(st.lists(CONTROL_WORDS, max_size=5), st.sampled_from([b" ", b"  ", b""]))
def test_the_parser_finds_each_line_what_splitting_it_found(words, space):
    line = space.join(words)
    assert parse_control_line(line) == reference_parse(line)
    assert type(parse_control_line(line)) is Command


SEND_PIECES = st.sampled_from(
    [b"SEND MESSAGE", b"SEND", b"MESSAGE", b"a", b"x.y:z", b"a<b", b"x" * 128, b"x" * 129,
     b"\xc3\xa9", b"\xff", b"", b"\r", b"\r\r", b" \r", b"hi there", b"{"]
)  # fmt: skip


@settings(max_examples=1000, deadline=None)
@given(st.lists(SEND_PIECES, max_size=5), st.sampled_from([b" ", b"  ", b""]))
def test_the_quick_send_reading_takes_what_the_parser_takes_as_a_send(pieces, space):
    line = space.join([b"SEND MESSAGE", *pieces]) if pieces[:1] != [b""] else space.join(pieces)
    quick, command = wsboard.parse_send_line(line), parse_control_line(line)
    if quick is None:
        assert command.verb != "send"  # it leaves no SEND to the parser
    else:
        assert command == Command("send", quick)


def test_the_quick_send_reading_keeps_spaces_and_drops_only_the_crlf():
    assert wsboard.parse_send_line(b"SEND MESSAGE a  two  spaces ") == ("a", " two  spaces ")
    assert wsboard.parse_send_line(b"SEND MESSAGE a caf\xc3\xa9\r") == ("a", "caf\u00e9")
    refused = [b"SEND MESSAGE a", b"SEND MESSAGE a ", b"SEND MESSAGE a \r", b"SEND MESSAGE a<b x"]
    for line in refused + [b"SEND MESSAGE a \xff", b"SEND  MESSAGE a x"]:
        assert wsboard.parse_send_line(line) is None
        assert parse_control_line(line).verb == "error"


def test_every_command_answers_with_at_least_one_line():
    for verb, args in (("list", ()), ("send", ("nobody", "x")), ("error", ("why",))):
        lines = wsboard.run_command(Command(verb, args), wsboard.ControlConnection(wsboard.Board()))
        assert lines and all("\n" not in line for line in lines)


def test_split_lines_keeps_the_unfinished_tail():
    lines, rest = wsboard.split_lines(bytearray(b"one\ntwo\r\nthr"))
    assert lines == [b"one", b"two\r"] and rest == bytearray(b"thr")


# Client ids ###################################################################


@pytest.mark.parametrize("client_id", ["a", "ABC123", "user_1.tab-2:x", "x" * 128])
def test_valid_client_ids(client_id):
    assert wsboard.is_valid_client_id(client_id)


@pytest.mark.parametrize(
    "client_id", ["", "x" * 129, "a b", "a\nb", "<b>", "a/b", "\u00e9", None, 5]
)
def test_invalid_client_ids(client_id):
    assert not wsboard.is_valid_client_id(client_id)


def test_board_ids_are_random_and_valid():
    ids = {wsboard.new_board_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(len(i) == 10 and wsboard.is_valid_client_id(i) for i in ids)


# Frames #######################################################################


def test_text_frame_is_one_final_unmasked_text_frame():
    assert wsboard.text_frame("hi") == b"\x81\x02hi"
    long = wsboard.text_frame("x" * 300)
    assert long[:4] == b"\x81\x7e\x01\x2c" and len(long) == 304


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_heads_are_gevent_websockets_at_every_length_boundary(size):
    from geventwebsocket.websocket import Header

    text = ("\u00e9" * size)[: size // 2] + "x" * (size % 2)  # size bytes of UTF-8
    payload = text.encode()
    assert len(payload) == size
    head = bytes(Header.encode_header(True, wsboard.OPCODE_TEXT, b"", size, 0))
    assert wsboard.text_frame(text) == head + payload


def test_close_payload_carries_code_then_reason():
    assert wsboard.close_payload(4001, "bye") == struct.pack("!H", 4001) + b"bye"
    assert wsboard.close_payload(1000, bytearray(b"ok")) == b"\x03\xe8ok"
    assert wsboard.close_payload(None) == b""


def test_close_payload_fits_a_control_frame_without_splitting_a_character():
    payload = wsboard.close_payload(1001, "\u00e9" * 100)
    assert len(payload) <= 125
    payload[2:].decode("utf-8")


def test_unmask_reverses_masking():
    mask = b"\x01\x02\x03\x04"
    data = bytes(range(256)) * 3 + b"tail"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    assert wsboard.unmask(masked, mask) == data
    assert wsboard.unmask(b"", mask) == b""
    assert wsboard.unmask(b"\x00\x00\x00", mask) == b"\x01\x02\x03"


def test_websocket_accept_matches_rfc_6455_example():
    assert wsboard.websocket_accept("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


def good_handshake(**changes):
    environ = {
        "REQUEST_METHOD": "GET",
        "HTTP_CONNECTION": "keep-alive, Upgrade",
        "HTTP_SEC_WEBSOCKET_VERSION": "13",
        "HTTP_SEC_WEBSOCKET_KEY": "dGhlIHNhbXBsZSBub25jZQ==",
        "QUERY_STRING": "id=abc",
        "REMOTE_ADDR": "10.0.0.7",
    }
    environ.update(changes)
    return environ


def parse(environ, version="HTTP/1.1", address=("10.0.0.7", 5555), trusted=()):
    return wsboard.parse_handshake(environ, version, address, trusted)


def test_a_good_handshake_parses_once_into_everything_the_checks_need():
    hs = parse(good_handshake(HTTP_ORIGIN="http://a.example", HTTP_HOST="a.example"))
    assert isinstance(hs, wsboard.Handshake)
    assert (hs.client_id, hs.ip, hs.peer, hs.origin, hs.host, hs.subprotocol) == (
        "abc",
        "10.0.0.7",
        "10.0.0.7:5555",
        "http://a.example",
        "a.example",
        "",
    )


def test_a_handshake_carries_the_resume_point_the_token_and_the_subprotocol():
    hs = parse(
        good_handshake(
            QUERY_STRING="id=abc&exp=99&token=ff&epoch=9f1c&last=41",
            HTTP_SEC_WEBSOCKET_PROTOCOL="other, wsboard.v1",
        )
    )
    assert (hs.exp, hs.token, hs.epoch, hs.last, hs.subprotocol) == (
        "99",
        "ff",
        "9f1c",
        41,
        "wsboard.v1",
    )


def test_behind_a_trusted_proxy_the_peer_is_the_browsers_address():
    environ = good_handshake(REMOTE_ADDR="10.0.0.1", HTTP_X_FORWARDED_FOR="203.0.113.9")
    hs = parse(environ, address=("10.0.0.1", 40000), trusted=wsboard._networks("10.0.0.1"))
    assert (hs.ip, hs.peer) == ("203.0.113.9", "203.0.113.9:40000")


@pytest.mark.parametrize(
    "changes, version, status",
    [
        ({"QUERY_STRING": ""}, "HTTP/1.1", 400),
        ({"QUERY_STRING": "id="}, "HTTP/1.1", 400),
        ({"QUERY_STRING": "id=a&id=b"}, "HTTP/1.1", 400),
        ({"QUERY_STRING": "id=%3Cscript%3E"}, "HTTP/1.1", 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": "not base64!"}, "HTTP/1.1", 400),
        ({"HTTP_SEC_WEBSOCKET_KEY": "c2hvcnQ="}, "HTTP/1.1", 400),
        ({"HTTP_SEC_WEBSOCKET_VERSION": "8"}, "HTTP/1.1", 426),
        ({"REQUEST_METHOD": "POST"}, "HTTP/1.1", 400),
        ({}, "HTTP/1.0", 400),
        ({"HTTP_CONNECTION": "close"}, "HTTP/1.1", 400),
    ],
)
def test_bad_handshakes_are_refused_with_a_status(changes, version, status):
    refusal = parse(good_handshake(**changes), version)
    assert isinstance(refusal, wsboard.Refusal)
    assert refusal.status == status and refusal.reason


# /sendMessage body ############################################################


def test_send_request_body_parses():
    assert wsboard.parse_send_request(b'{"clientId": "a1", "message": "hi there"}') == (
        "a1",
        "hi there",
    )


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b"[]",
        b'"text"',
        b"\xff",
        b'{"message": "x"}',
        b'{"clientId": "a"}',
        b'{"clientId": "a b", "message": "x"}',
        b'{"clientId": "a", "message": 5}',
        b'{"clientId": 7, "message": "x"}',
    ],
)
def test_bad_send_request_bodies_raise_with_a_reason(body):
    with pytest.raises(wsboard.BadRequest) as info:
        wsboard.parse_send_request(body)
    assert str(info.value)


# Configuration ################################################################


def test_defaults_are_safe_for_a_single_box():
    config = wsboard.load_config([], environ={})
    assert config.host == "127.0.0.1" and config.port == 8080
    assert config.max_line == 1024 * 1024


def test_a_flag_beats_the_environment_which_beats_the_default():
    env = {"WSBOARD_PORT": "9000", "WSBOARD_HOST": "0.0.0.0"}
    config = wsboard.load_config(["--port", "9001"], environ=env)
    assert config.port == 9001 and config.host == "0.0.0.0"


@pytest.mark.parametrize(
    "argv, env, message",
    [
        (["--port", "70000"], {}, "--port='70000': must be 0-65535"),
        ([], {"WSBOARD_PORT": "http"}, "WSBOARD_PORT='http': is not a number"),
        ([], {"WSBOARD_MAX_LINE": "0"}, "WSBOARD_MAX_LINE='0': must be at least 1"),
        ([], {"WSBOARD_WRITE_TIMEOUT": "nan"}, "WSBOARD_WRITE_TIMEOUT='nan': must be a positive"),
        ([], {"WSBOARD_CONTROL": "/tmp/" + "x" * 120}, "longer than the 107 bytes"),
        (["--log-level", "loud"], {}, "must be one of"),
    ],
)
def test_bad_configuration_values_are_refused_by_name(argv, env, message):
    with pytest.raises(wsboard.ConfigError) as info:
        wsboard.load_config(argv, environ=env)
    assert message in str(info.value)


def test_every_option_has_a_flag_an_environment_variable_and_help():
    text = wsboard.argument_parser().format_help()
    for option in wsboard.OPTIONS:
        assert option.flag in text and option.env in text


def test_the_registry_counts_by_id_and_address_as_sockets_come_and_go():
    registry = wsboard.Registry()
    conns = [
        wsboard.Connection(cid, f"1.{n}", f"{ip}:{n}", ip, None, wsboard.FRAMINGS[""])
        for n, (cid, ip) in enumerate([("a", "10.0.0.1"), ("a", "10.0.0.2"), ("b", "10.0.0.1")])
    ]
    for conn in conns:
        registry.add(conn)
    assert (
        len(registry) == 3
        and registry.count_for_id("a") == 2
        and registry.count_for_ip("10.0.0.1") == 2
    )
    registry.remove(conns[0])
    registry.remove(conns[0])  # twice: no harm
    assert (
        len(registry) == 2
        and registry.count_for_id("a") == 1
        and registry.count_for_ip("10.0.0.1") == 1
    )
    assert [c.client_id for c in registry] == ["a", "b"]
    for conn in conns[1:]:
        registry.remove(conn)
    assert (
        len(registry) == 0
        and registry.sockets_of("a") == []
        and registry.count_for_ip("10.0.0.1") == 0
    )


# Whole-word verbs, HELP from the table ########################################


@pytest.mark.parametrize(
    "line",
    [b"KICKME", b"KICKXbc", b"KICKALL", b"BROADCASTx", b"PINGX", b"HELPME", b"LIST", b"SEND"],
)
def test_a_verb_never_matches_by_prefix(line):
    assert parse_control_line(line) == Command("error", ("Unknown command",))


def test_verbs_without_their_argument_say_what_is_missing():
    assert parse_control_line(b"KICK") == Command("error", ("Missing client id",))
    assert parse_control_line(b"KICK ") == Command("error", ("Missing client id",))
    assert parse_control_line(b"BROADCAST") == Command("error", ("Missing message text",))
    assert parse_control_line(b"KICK me") == Command("kick", ("me",))


def test_help_is_made_from_the_verb_table_and_the_json_ops():
    help_line = wsboard.help_line()
    assert help_line.startswith("OK commands: ")
    for verb in wsboard.VERBS.values():
        assert verb.usage in help_line
    for op in wsboard.JSON_OPS:
        assert op in help_line


# Inputs that once dropped the control connection ##############################


def board_context(**settings):
    return wsboard.ControlConnection(wsboard.Board(wsboard.Config(**settings)))


def json_answer(ctx, line: bytes) -> dict:
    (answer,) = wsboard.run_command(parse_control_line(line), ctx)
    return json.loads(answer)


@pytest.mark.parametrize(
    "line, error",
    [
        (b'{"op":' + b"[" * 2000 + b"]" * 2000 + b"}", "nested too deeply"),
        (b'{"op":"send","to":"a","data":' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"op":"send","to":"a","data":"\\ud800"}', "lone surrogates"),
        (b'{"op":"kick","id":"a","code":4000.0}', '"code" must be'),
        (b'{"op":"kick","id":"a","code":true}', '"code" must be'),
        (b'{"op":"kick","id":"a","reason":"\\udfff"}', "lone surrogates"),
        (b'{"op":"send","to":"a","data":NaN}', "NaN is not a JSON number"),
        (b'{"op":"send","to":"a","data":-Infinity}', "-Infinity is not a JSON number"),
        (b'{"op":"send","to":"a","data":1e999}', "out of range"),
    ],
)
def test_json_inputs_that_once_crashed_get_an_error_answer(line, error):
    answer = json_answer(board_context(), line)
    assert answer["ok"] is False and error in answer["error"]


def test_a_fan_out_to_many_sockets_gives_other_greenlets_a_turn_between_chunks():
    import gevent

    conns = [
        wsboard.Connection(f"c{n}", f"1.{n}", "x:1", "10.0.0.1", RecordingSocket(),
                           wsboard.FRAMINGS[""])
        for n in range(2 * wsboard.YIELD_EVERY + 500)
    ]  # fmt: skip
    written_when_others_ran = []
    for _ in range(2):
        gevent.spawn(lambda: written_when_others_ran.append(sum(len(c.ws.frames) for c in conns)))
    assert wsboard.deliver(conns, "x", None) == len(conns)
    assert written_when_others_ran == [wsboard.YIELD_EVERY, wsboard.YIELD_EVERY]
    assert all(c.ws.frames == [b"\x81\x01x"] for c in conns)


class PingedSocket(RecordingSocket):
    """A socket that records when it was pinged."""

    pong_due = 0.0
    pinged_at = None

    def ping(self, now: float) -> None:
        self.pong_due, self.pinged_at = now, time.monotonic()


def board_of_pinged_sockets(interval: float, count: int, kind: type = PingedSocket):
    board = wsboard.Board(wsboard.Config(ping_interval=interval))
    for n in range(count):
        conn = wsboard.Connection(f"c{n}", f"1.{n}", "x:1", "10.0.0.1", kind(),
                                  wsboard.FRAMINGS[""])  # fmt: skip
        board.hub.attach(conn, handshake(f"c{n}"))
    return board


def test_a_heartbeat_round_pings_in_chunks_spaced_apart():
    """Pongs come back as fast as pings go out: a round sent at once made ten thousand pongs
    arrive together, and a SEND behind them waited 130-158 ms."""
    count = 2 * wsboard.PING_CHUNK + 10
    board = board_of_pinged_sockets(0.6, count)  # 3 chunks: 50 ms apart
    board.heartbeat_round(time.monotonic())
    times = sorted(conn.ws.pinged_at for conn in board.hub.local_connections())
    assert len(times) == count and None not in times
    chunk, pause = wsboard.PING_CHUNK, 0.6 * wsboard.PING_SPREAD / 3
    assert times[chunk - 1] - times[0] < pause / 2  # a chunk goes at once
    assert times[chunk] - times[chunk - 1] >= pause * 0.8  # without a pause: µs
    assert times[2 * chunk] - times[2 * chunk - 1] >= pause * 0.8


def test_a_heartbeat_round_is_spread_over_a_quarter_of_the_interval():
    """Six gunicorn workers whose rounds of 16,700 sockets each took 0.66 s (10 ms between
    chunks) kept both cores busy for 2 s; spread over the interval they leave room."""
    board = board_of_pinged_sockets(2.0, 8 * wsboard.PING_CHUNK)
    started = time.monotonic()
    board.heartbeat_round(started)
    took = time.monotonic() - started
    assert 7 / 8 * 0.5 * 0.9 <= took < 0.5 + 0.25  # 7 pauses of 62.5 ms; 10 ms each: 70 ms


class PongingSocket(RecordingSocket):
    """A socket whose pong comes at once: every round pings it."""

    pong_due = 0.0

    def __init__(self) -> None:
        super().__init__()
        self.pinged = []

    def ping(self, now: float) -> None:
        self.pinged.append(time.monotonic())


def test_heartbeat_rounds_begin_an_interval_apart_however_long_they_spread():
    import gevent

    board = board_of_pinged_sockets(0.4, 8 * wsboard.PING_CHUNK, PongingSocket)
    first = next(iter(board.hub.local_connections())).ws
    beating = gevent.spawn(board.heartbeat)
    try:
        with gevent.Timeout(5):
            while len(first.pinged) < 3:
                gevent.sleep(0.01)
    finally:
        beating.kill()
    # Each round takes 87.5 ms: begun that long after the last one ended, 3 rounds take 0.975 s.
    assert first.pinged[2] - first.pinged[0] < 2 * 0.4 + 0.1


def test_an_idempotent_retry_echoes_its_own_ref():
    ctx = board_context()
    hub = ctx.board.hub
    ws = RecordingSocket()
    hs = handshake("a")
    hub.attach(wsboard.Connection("a", "1.1", "x:1", "10.0.0.1", ws, wsboard.FRAMINGS[""]), hs)
    first = json_answer(ctx, b'{"op":"send","to":"a","data":"x","key":"k","ref":1}')
    again = json_answer(ctx, b'{"op":"send","to":"a","data":"x","key":"k","ref":2}')
    ctx.batch.release()
    assert (first["ref"], again["ref"], again["duplicate"]) == (1, 2, True)
    assert "duplicate" not in first and len(ws.frames) == 1


def one_answer_per_line(ctx, line: bytes) -> None:
    lines = wsboard.run_command(parse_control_line(line), ctx)
    assert lines and all("\n" not in answer for answer in lines)
    if lines[0] == "=== START ===":
        assert lines[-1] == "=== END ==="
    else:
        assert len(lines) == 1
    if line.rstrip(b"\r").startswith(b"{"):
        answer = json.loads(lines[0])
        assert isinstance(answer, dict) and isinstance(answer["ok"], bool)


PROPERTY_CONTEXT = board_context()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_every_plain_line_gets_exactly_one_answer(line):
    one_answer_per_line(PROPERTY_CONTEXT, line.replace(b"\n", b""))


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["send", "broadcast", "list", "kick", "ping", "stats", "nope", 7, None]),
    st.dictionaries(
        st.sampled_from(["to", "data", "key", "id", "code", "reason", "ref"]), json_values
    ),
)
def test_every_json_line_gets_exactly_one_answer(op, fields):
    line = json.dumps({"op": op, **fields}, allow_nan=True).encode()
    one_answer_per_line(PROPERTY_CONTEXT, line)


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([b"SEND MESSAGE ", b"KICK ", b"BROADCAST ", b"{", b'{"op":"send","to":']),
    st.binary(max_size=200),
)
def test_every_line_with_a_real_verb_and_any_tail_gets_exactly_one_answer(head, tail):
    one_answer_per_line(PROPERTY_CONTEXT, (head + tail).replace(b"\n", b""))


# /sendMessage in-process, through the real WSGI app ###########################


def json_post(path: str, body: bytes, length: int | None = None) -> dict:
    """The WSGI environ of a local JSON POST to path."""
    return {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8080",
        "HTTP_HOST": "127.0.0.1:8080",
        "REMOTE_ADDR": "127.0.0.1",
        "CONTENT_TYPE": "application/json",
        "CONTENT_LENGTH": str(len(body) if length is None else length),
        "wsgi.input": io.BytesIO(body),
        "wsgi.url_scheme": "http",
        "wsgi.errors": io.StringIO(),
    }


def post_send_message(board, body: bytes, length: int | None = None) -> tuple:
    environ = json_post("/sendMessage", body, length)
    status = []
    chunks = board(environ, lambda s, headers, exc_info=None: status.append(s))
    return int(status[0].split()[0]), json.loads(b"".join(chunks))


SEND_BOARD = wsboard.Board()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_every_send_message_body_gets_a_json_answer_and_never_a_500(body):
    status, answer = post_send_message(SEND_BOARD, body)
    assert status in (200, 400) and set(answer) == {"error", "message"}


def test_a_deeply_nested_send_message_body_is_a_400():
    status, answer = post_send_message(SEND_BOARD, b"[" * 50_000 + b"]" * 50_000)
    assert status == 400 and answer["error"] is True


def test_a_send_message_body_shorter_than_its_length_is_a_408():
    status, answer = post_send_message(SEND_BOARD, b'{"clientId":"a"', length=100)
    assert status == 408 and answer["error"] is True


# Limits that fit the machine ##################################################


def test_the_descriptor_limit_is_raised_when_it_can_be():
    assert wsboard.descriptor_plan(1024, 1 << 20, 10000, 256) == (11344, 10000, 256, 1024)


def test_limits_are_lowered_to_fit_a_descriptor_limit_that_cannot_be_raised():
    soft, conns, control, headroom = wsboard.descriptor_plan(256, 256, 10000, 256)
    assert soft == 256 and conns + control + headroom + wsboard.FD_RESERVE <= 256
    assert conns >= 100 and control >= 1 and headroom >= 1


def test_the_inbox_keeps_a_total_byte_budget_dropping_the_oldest_ids():
    inbox = wsboard.Inbox(100, 1 << 20, 300, 1000, total_bytes=1000)
    for n in range(10):
        inbox.add(f"id{n}", "x" * 250, now=1.0, offline=True)
    assert inbox.total_bytes <= 1000 and len(inbox) <= 4
    assert inbox.take_undelivered("id9", 1.0) == ["x" * 250]
    assert inbox.take_undelivered("id0", 1.0) == []


# The control socket's place ###################################################


def test_auto_picks_a_private_directory_and_an_explicit_path_is_kept(tmp_path):
    assert wsboard.control_socket_path("/x/y.sock") == "/x/y.sock"
    path = wsboard.control_socket_path("auto", environ={"XDG_RUNTIME_DIR": str(tmp_path)})
    assert path.endswith("/wsboard.sock")
    directory = os.path.dirname(path)
    assert not os.stat(directory).st_mode & 0o022


def test_a_world_writable_directory_without_the_sticky_bit_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    assert "writable by everyone" in wsboard.directory_refusal(str(shared / "c.sock"))
    shared.chmod(0o1777)
    assert wsboard.directory_refusal(str(shared / "c.sock")) is None
    assert "another user could take the path" in wsboard.directory_warning(str(shared / "c.sock"))
    assert wsboard.directory_warning(str(tmp_path / "c.sock")) is None


def test_a_directory_another_user_can_write_is_not_private(tmp_path):
    assert wsboard.private_directory(str(tmp_path), os.getuid(), make=False)
    tmp_path.chmod(0o777)
    assert not wsboard.private_directory(str(tmp_path), os.getuid(), make=False)
    tmp_path.chmod(0o700)
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    if os.getuid() == 0:  # as CI runs: root may give it away, and a root-owned one is private
        os.chown(theirs, 4242, -1)
        assert not wsboard.private_directory(str(theirs), os.getuid(), make=False)
    else:  # ours, as another user sees it
        assert not wsboard.private_directory(str(theirs), os.getuid() + 4242, make=False)


def test_tokens_are_accepted_in_either_hex_case():
    secret = b"a-secret-of-16-chars!"
    token = wsboard.mint_token(secret, "u1", 1900000000)
    assert token == token.lower()
    assert wsboard.token_refusal(secret, "u1", "1900000000", token.upper(), 1.8e9) is None


@pytest.mark.parametrize(
    "argv",
    [["--port", "x"], ["--ping-timeout", "soon"], ["--inbox", "1.5"], ["--control-mode", "rw"]],
)
def test_every_bad_number_is_said_the_same_way(argv):
    with pytest.raises(wsboard.ConfigError) as info:
        wsboard.load_config(argv, environ={})
    assert str(info.value).startswith(f"{argv[0]}={argv[1]!r}: is not a number")


# Channel verbs ################################################################


@pytest.mark.parametrize(
    "line, command",
    [
        (b"JOIN room u1", Command("join", ("room", "u1"))),
        (b"LEAVE room u1 ", Command("leave", ("room", "u1"))),
        (b"PUBLISH room  two  spaces ", Command("publish", ("room", " two  spaces "))),
        (b"ONLINE a b  c", Command("online", (["a", "b", "c"],))),
        (b"COUNT", Command("count", (None,))),
        (b"COUNT presence-x", Command("count", ("presence-x",))),
        (b"LIST CHANNEL a=b@c,d.e;f", Command("list_channel", ("a=b@c,d.e;f",))),
        (b"LIST CHANNELS", Command("list_channels")),
    ],
)
def test_channel_verbs_parse(line, command):
    assert parse_control_line(line) == command


@pytest.mark.parametrize(
    "line, error",
    [
        (b"JOIN", "Missing channel"),
        (b"JOIN room", "Missing client id"),
        (b"JOIN ro/om u1", "Invalid channel name"),
        (b"JOIN " + b"r" * 165 + b" u1", "Invalid channel name"),
        (b"PUBLISH room", "Missing message text"),
        (b"ONLINE", "Missing client id"),
        (b"ONLINE " + b" ".join(b"i%d" % n for n in range(1001)), "Too many ids (limit 1000)"),
        (b"ONLINE ok b<d", "Invalid client id"),
        (b"LIST CHANNEL", "Missing channel"),
        (b"JOINX room u1", "Unknown command"),
        (b"LIST CHANNELS now", "Unknown command"),
    ],
)
def test_bad_channel_lines_are_refused_with_a_reason(line, error):
    assert parse_control_line(line) == Command("error", (error,))


def test_the_signed_string_adds_private_channels_after_bars():
    secret = b"a-secret-of-16-chars!"
    assert wsboard.signed_string("u1", 99, ["private-a", "presence-b"]) == (
        "u1.99|private-a|presence-b"
    )
    assert wsboard.mint_token(secret, "u1", 99) == wsboard.mint_token(secret, "u1", 99, [])
    token = wsboard.mint_token(secret, "u1", 1900000000, ["private-a"])
    assert wsboard.token_refusal(secret, "u1", "1900000000", token, 1.8e9, ["private-a"]) is None
    refusal = wsboard.token_refusal(secret, "u1", "1900000000", token, 1.8e9, ["private-b"])
    assert "sign the private and presence channels" in refusal


def test_a_signed_query_names_its_channels_and_signs_the_private_ones():
    secret = b"a-secret-of-16-chars!"
    query = wsboard.signed_query(secret, "u1", 60, now=1000, channels=["news", "private-me"])
    token = wsboard.mint_token(secret, "u1", 1060, ["private-me"])
    assert query == f"id=u1&channel=news&channel=private-me&exp=1060&token={token}"


def test_url_channels_are_bounded_and_checked():
    assert wsboard.parse_channels(["a", "b", "a"], 3) == ("a", "b")
    assert wsboard.parse_channels(["x"] * 4, 3).reason == "Too many channels (limit 3)"
    assert "Invalid channel name" in wsboard.parse_channels(["bad name"], 3).reason


# A bug is never a polite answer #################################################


def test_a_bug_inside_an_action_is_an_internal_error_on_every_front_end(monkeypatch):
    board = wsboard.Board()

    def broken(*args, **kwargs):
        raise KeyError("a bug, not an answer")

    for name in ("send", "start_send_group", "kick", "publish"):
        monkeypatch.setattr(board.actions, name, broken)
    ctx = wsboard.ControlConnection(board)
    assert wsboard.run_command(parse_control_line(b"KICK a"), ctx) == ["ERROR Internal error"]
    assert wsboard.run_command(parse_control_line(b"SEND MESSAGE a x"), ctx) == [
        "ERROR Internal error"
    ]
    (line,) = wsboard.run_command(parse_control_line(b'{"op":"kick","id":"a"}'), ctx)
    assert json.loads(line) == {"ok": False, "error": "Internal error"}
    send = json_post("/sendMessage", b'{"clientId":"a","message":"x"}')
    kick = json_post("/admin/kick", b'{"clientId":"a"}')
    status = []
    for environ in (send, kick):
        board(environ, lambda s, headers, exc_info=None: status.append(s))
    assert status[0].startswith("500") and "a bug, not an answer" in send["wsgi.errors"].getvalue()
    assert status[1].startswith("500")  # a LookupError from a bug was a polite 200 before


def test_publish_runs_bundle_consecutive_publishes_to_one_route_and_keep_the_order():
    a1, a2, a3, b1, n1 = (object() for _ in range(5))
    items = [
        ("PUBLISH", ("k:a", '{"n":1}'), a1),
        ("PUBLISH", ("k:a", '{"n":2}'), a2),
        ("PUBLISH", ("k:b", '{"n":3}'), b1),  # another route ends the run
        ("NUMSUB", ("k:a",), n1),  # so does any other command
        ("PUBLISH", ("k:a", '{"n":4}'), a3),
        ("PUBLISH", ("k:a", '{"n":5}'), None),  # answers none: still bundled, told nothing
    ]
    runs = wsboard.publish_runs(items)
    assert [(command, args) for command, args, _ in runs] == [
        ("PUBLISH", ("k:a", '[{"n":1},{"n":2}]')),
        ("PUBLISH", ("k:b", '{"n":3}')),
        ("NUMSUB", ("k:a",)),
        ("PUBLISH", ("k:a", '[{"n":4},{"n":5}]')),
    ]
    assert runs[0][2] == [a1, a2] and isinstance(runs[0][2], wsboard.Bundled)
    assert runs[1][2] is b1 and runs[2][2] is n1 and runs[3][2] == [a3, None]
    assert json.loads(runs[0][1][1]) == [{"n": 1}, {"n": 2}]


def test_a_bundle_stays_under_its_byte_bound():
    big = '"' + "x" * 100_000 + '"'
    runs = wsboard.publish_runs([("PUBLISH", ("k", big), None)] * 7)
    assert all(len(args[1]) < wsboard.BUNDLE_BYTES for _, args, _ in runs)
    assert (
        sum(len(json.loads(args[1])) for _, args, _ in runs if args[1][0] == "[")
        + sum(1 for _, args, _ in runs if args[1][0] != "[")
        == 7
    )


@settings(max_examples=300)
@given(
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1),
    st.text(),
    st.one_of(st.none(), st.integers(min_value=1).map(str)),
)
def test_a_bus_send_is_the_json_compact_json_writes(client_id, text, request):
    message = {"k": "s", "o": "7", "i": client_id, "t": text, "h": 1}
    message.update({"r": request} if request is not None else {"q": 1})
    assert wsboard.bus_send("7", client_id, text, request) == wsboard.compact_json(message)


@pytest.mark.skipif("GEVENT_TRACK_GREENLET_TREE" in os.environ, reason="the user chose")
def test_greenlets_record_no_spawning_tree():
    """A spawning stack per greenlet cost each handshake ~10 us: wsboard turns it off."""
    greenlet = wsboard.gevent.spawn(int)
    greenlet.join()
    assert wsboard.gevent.config.track_greenlet_tree is False
    assert greenlet.spawning_stack is None and greenlet.spawn_tree_locals is None


def pywsgi_environ(data: bytes) -> dict | None:
    """The environ pywsgi builds for data's request in wsboard's handler, or None if pywsgi
    refuses the request."""
    server = wsboard.WSGIServer(("127.0.0.1", 8080), lambda environ, start: [])
    server.init_socket = lambda: None
    server.environ = {"SERVER_NAME": "wsboard", "SERVER_PORT": "8080", "wsgi.version": (1, 0)}
    handler = wsboard.WebSocketHandler(None, ("127.0.0.1", 5555), server, rfile=io.BytesIO(data))
    try:
        requestline = handler.read_requestline()
        if not requestline or len(requestline) >= 8192:
            return None
        if not WSGIHandler.read_request(handler, requestline):
            return None
        environ = handler.get_environ()
    except Exception:
        return None
    finally:
        handler.cancel_deadline()
    return {k: v for k, v in environ.items() if not k.startswith("wsgi.input")}


def plain_environ(data: bytes) -> dict | None:
    base = {"SERVER_NAME": "wsboard", "SERVER_PORT": "8080", "wsgi.version": (1, 0)}
    request = wsboard.plain_upgrade(data, base, ("127.0.0.1", 5555))
    return None if request is None else request[0]


UPGRADE_HEAD = (
    b"GET /websocket?id=a&channel=news HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nCookie: a=1\r\nCookie: b=2\r\nAccept: x\r\nACCEPT:  y \r\n\r\n"
)


def test_a_plain_upgrade_gets_the_environ_pywsgi_builds():
    request = wsboard.plain_upgrade(UPGRADE_HEAD + b"\x81\x80", {}, ("127.0.0.1", 5555))
    assert request is not None
    environ, length, requestline = request
    assert length == len(UPGRADE_HEAD)  # the frame after the head is left for the session
    assert requestline == "GET /websocket?id=a&channel=news HTTP/1.1"
    assert environ["HTTP_COOKIE"] == "a=1; b=2" and environ["HTTP_ACCEPT"] == "x,y"
    assert plain_environ(UPGRADE_HEAD) == pywsgi_environ(UPGRADE_HEAD)


@pytest.mark.parametrize(
    "head",
    [
        UPGRADE_HEAD[:-2],  # not whole yet
        UPGRADE_HEAD.replace(b"GET", b"POST", 1),
        UPGRADE_HEAD.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
        UPGRADE_HEAD.replace(b"/websocket", b"/web%73ocket", 1),
        UPGRADE_HEAD.replace(b"GET /", b"GET  /", 1),
        UPGRADE_HEAD.replace(b"Upgrade: websocket", b"Upgrade: h2c", 1),
        UPGRADE_HEAD.replace(b"Accept: x", b"Accept_X: x", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Accept: x\r\n folded\r\n", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Accept: x\nX: y\r\n", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Content-Length: 0\r\n", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Transfer-Encoding: chunked\r\n", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Accept x\r\n", 1),
        UPGRADE_HEAD.replace(b"Accept: x\r\n", b"Accept: x\r\n" * 101, 1),
    ],
)
def test_anything_but_a_plain_upgrade_is_left_to_pywsgi(head):
    assert plain_environ(head) is None


VALUE = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=12)
PLAIN_VALUE = VALUE.filter(lambda value: "\r" not in value and "\n" not in value)
PLAIN_NAME = st.sampled_from(["Cookie", "X-A", "x-a", "Origin", "Connection", "Sec-WebSocket-Key"])
UPGRADE_LINE = b"Upgrade: websocket"


def request_head(method: bytes, target: bytes, version: bytes, lines: list) -> bytes:
    return b"%s %s %s\r\n%s\r\n\r\n" % (method, target, version, b"\r\n".join(lines))


@settings(max_examples=300)
@given(
    st.text(alphabet="/?=&ab", max_size=12).map(lambda path: ("/" + path).encode()),
    st.lists(st.tuples(PLAIN_NAME, PLAIN_VALUE), max_size=8),
    st.integers(min_value=0, max_value=8),
)
def test_every_plain_upgrade_is_taken_with_pywsgis_environ(target, pairs, at):
    lines = [f"{name}:{value}".encode("latin-1") for name, value in pairs]
    lines.insert(min(at, len(lines)), UPGRADE_LINE)
    data = request_head(b"GET", target, b"HTTP/1.1", lines)
    mine = plain_environ(data)
    assert mine is not None and mine == pywsgi_environ(data)


@settings(max_examples=500)
@given(
    st.sampled_from([b"GET", b"POST", b"get"]),
    st.text(alphabet="/?=&%ab \t", min_size=1, max_size=12).map(str.encode),
    st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    st.lists(
        st.tuples(st.sampled_from(["Upgrade", "X-A", "Bad Name", "A_B", " X", ""]), VALUE).map(
            lambda pair: f"{pair[0]}:{pair[1]}".encode("latin-1")
        ),
        max_size=8,
    ),
    st.integers(min_value=0, max_value=8),
)
def test_a_head_taken_at_once_gets_exactly_pywsgis_environ(method, target, version, lines, at):
    lines.insert(min(at, len(lines)), UPGRADE_LINE)
    data = request_head(method, target, version, lines)
    mine = plain_environ(data)
    if mine is not None:
        assert mine == pywsgi_environ(data)


# Freezing the collector's objects #############################################


def test_the_collector_freezes_a_population_that_moved_by_a_thousand_or_a_tenth():
    assert wsboard.freeze_step(900, 600, 0) is None  # too few to matter
    assert wsboard.freeze_step(10900, 10900, 10000) is None  # within a tenth
    assert wsboard.freeze_step(1000, 1000, 0) == "young"
    assert wsboard.freeze_step(11000, 11000, 10000) == "young"


def test_growth_is_frozen_at_once_and_a_shrink_once_it_has_settled():
    """A collection of the young is cheap, so growth is frozen while the sockets still come:
    at 16,000 opened at full speed, no full pass ran during the burst (two of 55-62 ms
    before). A shrink looks at everything once it has (nearly) stopped, so no cycle that
    died while frozen stays."""
    assert wsboard.freeze_step(8000, 2700, 2700) == "young"  # still coming
    assert wsboard.freeze_step(8000, 12000, 16000) is None  # still going
    assert wsboard.freeze_step(8000, 8050, 16000) == "all"  # within a hundredth: a trickle
    assert wsboard.freeze_step(0, 0, 16000) == "all"
